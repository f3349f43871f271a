"""difflab: denoising diffusion models that map formula-for-formula onto the papers.

Quickstart::

    import difflab
    run = difflab.train(dataset="digits", steps=3000)         # a run folder with samples.png, loss.png
    images = difflab.sample(run, n=16, sampler="ddim", steps=50)  # (16, 1, 8, 8) in [0, 1]
    vae = difflab.train_vae(dataset="fashion-mnist", image_size=32)   # an autoencoder for latent diffusion
    latent = difflab.train(dataset="fashion-mnist", image_size=32, vae=str(vae))
    student = difflab.distill(run, method="progressive", to_steps=4)   # samples in 4 steps
    difflab.export(run, "exported/digits", format="diffusers")   # DDPMPipeline.from_pretrained("exported/digits")
    sd = difflab.load("path/to/stable-diffusion-folder")           # diffusers folders load as difflab models
"""

from difflab.denoisers import ConsistencyParameterization, Denoiser, EDMParameterization, VPParameterization
from difflab.errors import DifflabError
from difflab.export import export
from difflab.generate import generate, sample
from difflab.models import (
           Model,
           NoisyClassifier,
           TrainedAutoencoder,
           load,
           load_autoencoder,
           load_classifier,
           load_model,
)
from difflab.tasks import (
    DiffusionConfig,
    DistillConfig,
    NoisyClassifierConfig,
    VAEConfig,
    distill,
    train,
    train_classifier,
    train_vae,
)
from difflab.training.config import RunConfig

__version__ = "0.1.0"
__all__ = ["ConsistencyParameterization", "Denoiser", "DifflabError", "DiffusionConfig", "DistillConfig",
           "EDMParameterization", "Model", "NoisyClassifier", "NoisyClassifierConfig", "RunConfig", "TrainedAutoencoder",
           "VAEConfig", "VPParameterization", "distill", "export", "generate", "load", "load_autoencoder", "load_classifier",
           "load_model", "sample", "train", "train_classifier", "train_vae", "__version__"]
