"""Measuring the models: `reconstructions` (`xctdiff evaluate`: reconstructions of held-out CTs scored
beside the mean-CT and kNN baselines), `autoencoder` (`xctdiff evaluate-autoencoder`: the VQ-GAN's
ceiling) and `style` (`xctdiff evaluate-style`: real films against DRRs). Inference side: nothing here
imports the training package."""
