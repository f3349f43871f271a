"""``difflab serve``: a local web page to generate images from a model (difflab.serve; the [serve] extra)."""

from __future__ import annotations

import argparse

EPILOG_SERVE = """examples:
  difflab serve runs/digits                          # open http://127.0.0.1:7860 in a browser; Ctrl-C stops it
  difflab serve runs/digits-cond --port 8000         # a class-conditional model: pick a class, a guidance scale
  difflab serve runs/shapes                          # a text-to-image model: type a prompt (and a negative one)
  difflab serve runs/digits/checkpoints/step_0001000 --device cpu
  difflab serve runs/digits --host 0.0.0.0           # on purpose: reachable from other machines on the network

The page has the sampler, steps, seed and number of images (plus the class or prompt and the guidance scale where
the model takes them), shows the images with the network evaluations (NFE) and the time they took, and offers the
grid as a PNG to download. The model loads once; one request samples at a time. Nothing is sent to the internet:
Gradio's telemetry and share links are off. Needs the [serve] extra: pip install 'difflab[serve]'."""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="a local web page to generate images from a model",
                       description="Serve a web page that generates images from a run folder or checkpoint with any "
                       "sampler, on this machine only unless --host says otherwise.",
                       epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_FOLDER", help="a run folder (its newest checkpoint), a checkpoint folder, "
                   "or any other model `difflab sample` loads")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on (default: 7860; a port in use is "
                   "an error that suggests another)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 opens the page to the network)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from difflab.serve import serve  # gradio is imported only when the command runs, not for `difflab --help`

    serve(args.model, host=args.host, port=args.port, device=args.device)
    return 0
