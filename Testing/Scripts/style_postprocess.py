"""Would blurring, histogram- or spectrum-matching the style-transferred films fool the style classifier? (an experiment)

    python Testing/Scripts/style_postprocess.py MODEL REAL_FOLDER DS/datalist.json [MAX_IMAGES] [--reconstruct]

The films, DRRs, classifier and edge measure of `xctdiff evaluate-style`; prints the balanced accuracy
and the bone-edge preservation for the transfer alone and followed by a Gaussian blur and/or a match
of each film's intensity histogram to the pooled DRRs', by an edge-preserving denoiser (total
variation, bilateral), or by a match of each film's radial power spectrum to the training DRRs' mean.
With ``--reconstruct`` (MODEL a whole model folder) the transfer and the spectrum match are also scored
by reconstructing from them: the consistency (vs the image given) and the layout agreement (vs the film
as loaded). Used in the README's style section and Docs/RESULTS.md (nothing was adopted: what fools the
classifier erases the ribs, and the spectrum match raises the consistency while the reconstructions
agree less with the films).
"""
from __future__ import annotations

import sys

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.restoration import denoise_bilateral, denoise_tv_chambolle

from XctDiffCore.evaluation.style import (consistency_with_and_without_style, domain_accuracy, edge_preservation,
                                           load_drr_images, load_real_images, pipeline_consistency, radial_power,
                                           style_features, transfer)
from XctDiffCore.style import load_style_generator


def match_histogram(images01: np.ndarray, reference01: np.ndarray) -> np.ndarray:
    """Each image's intensity quantiles mapped onto the reference's (a monotone curve per image)."""
    q = np.linspace(0, 1, 257)
    target = np.quantile(reference01.ravel(), q)
    return np.stack([np.interp(im.ravel(), np.quantile(im.ravel(), q), target).reshape(im.shape) for im in images01]).astype(np.float32)


def match_spectrum(images01: np.ndarray, reference01: np.ndarray, rings: int = 16) -> np.ndarray:
    """Each image filtered (zero phase, gain interpolated over the radius) so that its radial power spectrum
    becomes the reference images' geometric mean; the mean intensity is kept."""
    target = np.exp(np.mean([np.log(radial_power(r, rings)) for r in reference01], 0))
    out = []
    for image in images01.astype(np.float64):
        fy, fx = np.meshgrid(np.fft.fftfreq(image.shape[0]), np.fft.fftfreq(image.shape[1]), indexing="ij")
        gain = np.interp(np.hypot(fy, fx) / 0.5 * rings, np.arange(rings) + 0.5, np.sqrt(target / radial_power(image, rings)))
        out.append(np.real(np.fft.ifft2(np.fft.fft2(image - image.mean()) * gain)) + image.mean())
    return np.clip(np.stack(out), 0, 1).astype(np.float32)


def per_image(filter_image, images01: np.ndarray) -> np.ndarray:
    """``filter_image`` applied to each ``[H, W]`` image of ``[N, H, W]``, as float32."""
    return np.stack([filter_image(image) for image in images01]).astype(np.float32)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--reconstruct"]
    if len(args) < 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    generator, size = load_style_generator(args[0])
    real, _ = load_real_images([args[1]], size, int(args[3]) if len(args) > 3 else 60, 0)
    drr = load_drr_images(args[2], size)
    training_drr = load_drr_images(args[2], size, sections=("training",))
    moved, drr_features = transfer(generator, real), style_features(drr)

    def report(name: str, images: np.ndarray) -> None:
        accuracy = domain_accuracy(style_features(images), drr_features)["accuracy"]
        print(f"{name}: classifier {accuracy:.3f}, edge preservation {edge_preservation(real, images).mean():.3f}")

    print(f"real films: classifier {domain_accuracy(style_features(real), drr_features)['accuracy']:.3f}")
    report("transfer", moved)
    for sigma in (0.5, 0.8, 1.2):
        blurred = per_image(lambda m: gaussian_filter(m, sigma), moved)
        report(f"transfer + blur {sigma}", blurred)
        report(f"transfer + blur {sigma} + histogram", match_histogram(blurred, drr))
    report("transfer + histogram", match_histogram(moved, drr))
    for weight in (0.02, 0.05, 0.1):
        report(f"transfer + total variation {weight}", per_image(lambda m: denoise_tv_chambolle(m, weight=weight), moved))
    for sigma_color in (0.05, 0.1):
        report(f"transfer + bilateral {sigma_color}",
               per_image(lambda m: denoise_bilateral(m, sigma_color=sigma_color, sigma_spatial=1.5), moved))
    spectrum = match_spectrum(moved, training_drr)
    report("transfer + spectrum of the training DRRs", spectrum)
    if "--reconstruct" in sys.argv:
        score = pipeline_consistency(args[0], device="cpu")
        for name, images in (("transfer", moved), ("transfer + spectrum", spectrum)):
            c = consistency_with_and_without_style(score, real, images)
            print(f"{name}: consistency {c['without_style']:.3f} -> {c['with_style']:.3f} (not lowered on "
                  f"{100 * c['with_not_worse']:.0f} %), layout agreement {c['layout']['without_style']:.3f} -> "
                  f"{c['layout']['with_style']:.3f}")


if __name__ == "__main__":
    main()
