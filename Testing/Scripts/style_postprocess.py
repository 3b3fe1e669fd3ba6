"""Would blurring or histogram-matching the style-transferred films fool the style classifier? (an experiment)

    python Testing/Scripts/style_postprocess.py MODEL REAL_FOLDER DS/datalist.json [MAX_IMAGES]

The films, DRRs, classifier and edge measure of `xctdiff evaluate-style`; prints the balanced accuracy
and the bone-edge preservation for the transfer alone and followed by a Gaussian blur and/or a match
of each film's intensity histogram to the pooled DRRs', or by an edge-preserving denoiser (total
variation, bilateral). Used in the README's style section (nothing was adopted: what fools the
classifier erases the ribs).
"""
from __future__ import annotations

import sys

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.restoration import denoise_bilateral, denoise_tv_chambolle

from XctDiffCore.evaluation.style import (domain_accuracy, edge_preservation, load_drr_images, load_real_images,
                                           style_features, transfer)
from XctDiffCore.style import load_style_generator


def match_histogram(images01: np.ndarray, reference01: np.ndarray) -> np.ndarray:
    """Each image's intensity quantiles mapped onto the reference's (a monotone curve per image)."""
    q = np.linspace(0, 1, 257)
    target = np.quantile(reference01.ravel(), q)
    return np.stack([np.interp(im.ravel(), np.quantile(im.ravel(), q), target).reshape(im.shape) for im in images01]).astype(np.float32)


def per_image(filter_image, images01: np.ndarray) -> np.ndarray:
    """``filter_image`` applied to each ``[H, W]`` image of ``[N, H, W]``, as float32."""
    return np.stack([filter_image(image) for image in images01]).astype(np.float32)


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    generator, size = load_style_generator(sys.argv[1])
    real, _ = load_real_images([sys.argv[2]], size, int(sys.argv[4]) if len(sys.argv) > 4 else 60, 0)
    drr = load_drr_images(sys.argv[3], size)
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


if __name__ == "__main__":
    main()
