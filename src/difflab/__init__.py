"""difflab: denoising diffusion models that map formula-for-formula onto the papers.

Quickstart::

    import difflab
    run = difflab.train(dataset="digits", steps=3000)         # a run folder with samples.png, loss.png
    images = difflab.sample(run, n=16, sampler="ddim", steps=50)  # (16, 1, 8, 8) in [0, 1]
"""

from difflab.classifier import load_classifier, train_classifier
from difflab.config import TrainConfig
from difflab.denoisers import Denoiser
from difflab.errors import DifflabError
from difflab.pipeline import Model, generate, load_model, sample
from difflab.train import train

__version__ = "0.1.0"
__all__ = ["Denoiser", "DifflabError", "Model", "TrainConfig", "generate", "load_classifier", "load_model", "sample",
           "train", "train_classifier", "__version__"]
