"""A local web page to generate images from a model (``difflab serve``), built with Gradio (the ``[serve]`` extra).

    from difflab.serve import build_app, serve
    serve("runs/digits")                                        # http://127.0.0.1:7860 until Ctrl-C
    app = build_app(difflab.load_model("runs/digits-cond"))     # a gr.Blocks to launch or mount yourself

The page only collects settings. Everything else is plain Python, testable without a browser:
:func:`check_settings` turns what was typed into :func:`difflab.generate.sample`'s keywords (a one-line
:class:`DifflabError` for a bad value, which the page shows as its status line), and :func:`generate_images` samples
through the library -- the page never has a sampling path of its own.
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from difflab.conditioning import parse_classes
from difflab.errors import DifflabError
from difflab.extras import require
from difflab.generate import default_guidance_scale, sample
from difflab.models import Model, load_model
from difflab.samplers import SAMPLERS
from difflab.viz import make_grid, to_pil

MAX_IMAGES = 100      # images per request: a page is for looking, `difflab sample` is for making thousands
MAX_STEPS = 1000      # grid steps per request: the full chain of a 1000-step DDPM; the model checks its own limit
MAX_SEED = 2**32 - 1  # the browser sends numbers as doubles: keep seeds well inside the exactly representable ones
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# Pixel-art models (8x8 digits) would be blurred by the browser's smoothing when the gallery enlarges them; Gradio's
# thumbnails are at least 100 px wide (a row of 8 would scroll sideways) and carry their caption over the image (it
# hides a quarter of a tiny digit: the caption stays in the enlarged view). Class names are Gradio 6's.
CSS = """
#gallery img { image-rendering: pixelated; }
#gallery .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(32px, 1fr)); grid-auto-rows: auto; }
#gallery .grid-container .caption-label { display: none; }
"""


# ---------------------------------------------------------------------------------------------------------
# What the page shows and checks: plain functions of the model and the typed values.


def describe(model: Model, source: str | Path | None = None) -> str:
    """A Markdown title: where the model came from, pixel or latent, its parameterization, image size, classes."""
    c, h, w = model.image_shape
    where = source if source is not None else model.checkpoint or "a model"
    kind = "pixel" if model.encoder.pixel_space else "latent " + "x".join(map(str, model.shape))
    details = [f"{kind} model", _parameterization(model.parameterization.config()), f"{c}x{h}x{w} images"]
    if model.class_names is not None:
        names = model.class_names
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        details.append(f"{len(names)} classes: {shown}")
    elif model.takes_prompts:
        details.append("text-to-image")
    else:
        details.append("unconditional")
    if model.distillation:
        details.append(f"distilled ({model.distillation.get('method', '?')})")
    return f"## difflab · `{where}`\n{_escape(' · '.join(details))}"


def _parameterization(config: dict) -> str:
    """'eps-prediction, linear schedule, T=1000 (VP)', 'EDM, sigma_data 0.5', ... from a parameterization config."""
    kind = config.get("kind", "?")
    if "prediction" in config:
        return f"{config['prediction']}-prediction, {config.get('schedule', '?')} schedule, " \
               f"T={config.get('timesteps', '?')} ({kind.upper()})"
    if "base" in config:
        return f"consistency model on {_parameterization(config['base'])}"
    if "sigma_data" in config:
        return f"{kind.upper()}, sigma_data {config['sigma_data']:g}"
    return kind


def _escape(text: str) -> str:
    """Text shown verbatim in Markdown (class names and messages may hold * _ [ ] and such)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~" else ch for ch in text)


def _whole(value, name: str, low: int, high: int) -> int:
    """A whole number in [low, high] from a form field (None when it was left empty), or a one-line error."""
    if value is None or value == "":
        raise DifflabError(f"{name}: enter a whole number from {low} to {high}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DifflabError(f"{name} must be a whole number, got '{value}'") from None
    if not math.isfinite(number) or number != int(number):
        raise DifflabError(f"{name} must be a whole number, got {value}")
    if not low <= number <= high:
        raise DifflabError(f"{name} must be from {low} to {high}, got {int(number)}")
    return int(number)


def check_settings(model: Model, *, sampler: str | None = None, steps=None, seed=0, num=None,
                   guidance_scale=None, class_name: str | None = None, prompt: str | None = None,
                   negative_prompt: str | None = None) -> dict:
    """The keywords of :func:`difflab.generate.sample` (plus ``per_row`` for the grid) from the page's fields, or a
    one-line :class:`DifflabError` saying what to change. ``num`` is per class when ``class_name`` is 'all'; empty
    ``sampler``/``steps`` mean the model's own; guidance, class and prompts are read only where the model takes them."""
    given = None if steps in (None, "") else _whole(steps, "steps", 1, MAX_STEPS)
    sampler, steps = model.sampling(sampler or None, given)[:2]
    if sampler not in SAMPLERS:
        raise DifflabError(f"unknown sampler '{sampler}' (choose from {', '.join(SAMPLERS)})")
    num = _whole(num, "number of images", 1, MAX_IMAGES)
    out = {"sampler": sampler, "steps": steps, "seed": _whole(seed, "seed", 0, MAX_SEED), "per_row": None}
    if model.conditioner is not None:
        scale = default_guidance_scale(model) if guidance_scale in (None, "") else guidance_scale
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise DifflabError(f"the guidance scale must be a number, got '{guidance_scale}'") from None
        if not math.isfinite(scale) or scale < 0:
            raise DifflabError(f"the guidance scale must be 0 or more (0 = unconditional, 1 = conditional, more = "
                               f"stronger), got {scale:g}")
        out["guidance_scale"] = scale
    if model.takes_prompts:
        if not prompt or not prompt.strip():
            raise DifflabError("type a prompt: this is a text-to-image model")
        out["prompts"] = prompt.strip()
        if negative_prompt and negative_prompt.strip():
            out["negative_prompt"] = negative_prompt.strip()
    elif model.class_names is not None:
        spec = "all" if class_name in (None, "") else str(class_name)
        labels = parse_classes(spec, model.class_names)  # one-line error naming the model's classes
        if len(labels) > 1:
            out["per_row"] = num  # one row per class
            if num * len(labels) > MAX_IMAGES:
                raise DifflabError(f"at most {MAX_IMAGES} images at a time: with {len(labels)} classes that is "
                                   f"{MAX_IMAGES // len(labels)} per class, got {num}")
        out["classes"] = [model.class_names[k] for k in labels]  # names: sample() reads a name as that class
    out["n"] = num
    return out


@dataclass
class Generated:
    """What one click of Generate made: the images (PIL, in order), their captions, the grid and the status line."""

    images: list[Image.Image]
    captions: list[str]
    grid: Image.Image
    status: str


def generate_images(model: Model, settings: dict, *, progress: bool = False) -> Generated:
    """Sample with :func:`check_settings`'s keywords through :func:`difflab.generate.sample`; the library's warnings
    (a distilled model sampled off its grid, guidance of an untrained null condition) join the status line."""
    settings, stats = dict(settings), {}
    per_row = settings.pop("per_row", None)
    notes = []
    scale = settings.get("guidance_scale")
    if scale is not None and scale != 1 and not model.conditioner.trained_null:
        notes.append("this model was trained without dropping its condition, so guidance scales other than 1 "
                     "extrapolate from an untrained null condition")
    with warnings.catch_warnings(record=True) as caught:  # process-wide: the page samples one request at a time
        warnings.simplefilter("always")
        images = sample(model, settings.pop("n"), stats=stats, progress=progress, **settings)  # (N, C, H, W) in [0, 1]
    notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    images = images * 2 - 1  # the viz helpers take the model range [-1, 1]
    n, seed = len(images), settings["seed"]
    names = settings.get("classes")
    per_class = n // len(names) if names else n
    captions = [(f"{names[i // per_class]} · " if names and len(names) > 1 else "") + f"seed {seed + i % per_class}"
                for i in range(n)]
    seconds = stats["seconds"]
    status = (f"{n} image{'s' if n > 1 else ''} · {settings['sampler']}, {settings['steps']} steps · "
              f"{stats['nfe']} network evaluations (NFE) per image · {seconds:.2f} s "
              f"({seconds / n * 1000:.0f} ms/image)")
    status = _escape(status) + "".join(f"\n\n⚠ {_escape(note)}" for note in notes)
    return Generated(to_pil(images), captions, make_grid(images, per_row), status)


def error_status(error: Exception) -> str:
    """The status line for a one-line error (Markdown)."""
    return f"**Error:** {_escape(str(error))}"


# ---------------------------------------------------------------------------------------------------------
# The page: Gradio Blocks around the functions above.


def _gradio():
    """gradio, imported with its telemetry off (a one-line error naming the extra when it is missing)."""
    # Gradio reports usage and checks for a newer version over the internet unless this is off; a local page of
    # a local model has no business calling out. Set before the import: some of it reads the variable on import.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    gr = require("gradio", extra="serve", feature="difflab serve")
    major = gr.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 6:  # 6 moved theme/css to launch() and reworked Gallery's buttons
        raise DifflabError(f"difflab serve needs gradio 6 or newer, found {gr.__version__}: pip install -U "
                           "'difflab[serve]'")
    return gr


def build_app(model: Model, source: str | Path | None = None):
    """The page for ``model`` as a ``gr.Blocks`` (not started): settings on the left, the gallery, the status line
    (NFE and time, or what to fix) and the grid PNG to download on the right."""
    gr = _gradio()
    sampler, steps = model.sampling()[:2]
    conditional, text = model.class_names is not None, model.takes_prompts
    grids = Path(tempfile.mkdtemp(prefix="difflab-serve-"))  # the grid PNGs offered for download
    atexit.register(shutil.rmtree, grids, ignore_errors=True)

    with gr.Blocks(title=f"difflab · {source or model.checkpoint or 'model'}", analytics_enabled=False,
                   delete_cache=(600, 3600)) as app:  # Gradio's copies of the images: gone after an hour
        gr.Markdown(describe(model, source), elem_id="title")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                f_sampler = gr.Dropdown(list(SAMPLERS), value=sampler, label="sampler", elem_id="sampler",
                                        info="`difflab samplers` describes each")
                with gr.Row():
                    f_steps = gr.Number(steps, label="steps", precision=0, elem_id="steps", min_width=100,
                                        info=f"1 to {MAX_STEPS}")
                    f_seed = gr.Number(0, label="seed", precision=0, elem_id="seed", min_width=100,
                                       info="image i: seed + i")
                with gr.Row():
                    f_num = gr.Number(8 if model.conditioner is not None else 16, label="images", precision=0,
                                      elem_id="num-images", min_width=100, info=f"per class for 'all'; {MAX_IMAGES} "
                                      "at most" if conditional else f"at most {MAX_IMAGES}")
                    f_scale = gr.Number(default_guidance_scale(model) if model.conditioner is not None else None,
                                        label="guidance scale", elem_id="guidance-scale", min_width=100,
                                        visible=model.conditioner is not None, info="0 uncond., 1 cond., >1 stronger")
                f_class = gr.Dropdown(["all", *(model.class_names or [])], value="all", label="class",
                                      elem_id="class", visible=conditional, info="'all': one row per class")
                f_prompt = gr.Textbox((model.conditioner.prompts or [""])[0] if text else "", label="prompt",
                                      elem_id="prompt", visible=text)
                f_negative = gr.Textbox("", label="negative prompt (optional)", elem_id="negative-prompt",
                                        visible=text, info="pushed away from; replaces the empty prompt in guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="images", show_label=False, elem_id="gallery", format="png", columns=8,
                                     height=520, object_fit="contain", buttons=["download", "fullscreen"],
                                     interactive=False)
                status = gr.Markdown("Choose the settings and press **Generate**.", elem_id="status")
                grid_file = gr.File(label="the grid, to download (PNG)", elem_id="grid-file", interactive=False,
                                    visible=False)  # shown with the first images

        def on_generate(sampler, steps, seed, num, class_name, prompt, negative, scale,
                        progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's way to ask for a progress bar)
            try:
                settings = check_settings(model, sampler=sampler, steps=steps, seed=seed, num=num,
                                          guidance_scale=scale, class_name=class_name, prompt=prompt,
                                          negative_prompt=negative)
                made = generate_images(model, settings, progress=True)
            except DifflabError as e:  # a user mistake: say it on the page; old images go, so none look current
                return None, error_status(e), gr.File(None, visible=False)
            path = grids / f"difflab_{settings['sampler']}_{settings['steps']}steps_seed{settings['seed']}.png"
            made.grid.save(path)
            columns = settings["per_row"] or min(8, math.ceil(math.sqrt(len(made.images))))
            return (gr.Gallery(list(zip(made.images, made.captions)), columns=columns), made.status,
                    gr.File(str(path), visible=True))

        # A new sampler brings its own default steps (all T for ddpm, a distilled model's count for its sampler),
        # set in the browser at once: no round trip that could overwrite steps typed right after.
        defaults = {name: model.sampling(name)[1] for name in SAMPLERS}
        f_sampler.change(None, f_sampler, f_steps, js=f"(sampler) => ({json.dumps(defaults)})[sampler]")
        button.click(on_generate, [f_sampler, f_steps, f_seed, f_num, f_class, f_prompt, f_negative, f_scale],
                     [gallery, status, grid_file], concurrency_limit=1)  # one sampling at a time on the one model
    return app


def launch_options(host: str = "127.0.0.1", port: int = 7860) -> dict:
    """The keywords ``gr.Blocks.launch`` gets: this machine only unless ``host`` says otherwise, and nothing that
    calls the internet (no share link, no SSR node server, no MCP server, no monitoring, no PWA)."""
    gr = _gradio()
    return {"server_name": host, "server_port": port, "share": False, "inbrowser": False, "ssr_mode": False,
            "mcp_server": False, "enable_monitoring": False, "pwa": False, "show_error": False, "quiet": True,
            "prevent_thread_lock": True, "footer_links": ["settings"], "css": CSS,
            # the system's fonts: no web font to fetch, whatever a theme's defaults become
            "theme": gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])}


def check_port(host: str, port: int) -> None:
    """A one-line error when ``port`` cannot be listened on at ``host`` (taken by another server, or privileged)."""
    if not 1 <= port <= 65535:
        raise DifflabError(f"--port must be from 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DifflabError(f"--host '{host}' is not an address of this machine") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a just-closed port is free
        try:
            probe.bind(address)
        except OSError as e:
            why = {errno.EADDRINUSE: f"another program uses it; pick another port, e.g. --port {port + 1}",
                   errno.EACCES: "ports below 1024 need administrator rights; pick another, e.g. --port 7860",
                   errno.EADDRNOTAVAIL: "that address is not one of this machine's; leave --host out for 127.0.0.1"}
            raise DifflabError(f"cannot listen on {host}:{port} ({e.strerror}): "
                               f"{why.get(e.errno, 'pick another --port or --host')}") from None


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 7860, device: str = "auto") -> None:
    """Load the model at ``path`` once and serve its page at http://host:port until Ctrl-C (or SIGTERM)."""
    _gradio()  # a missing extra is said before the model loads
    check_port(host, port)
    model = load_model(path, device=device)
    app = build_app(model, path)
    if host not in LOCAL_HOSTS:
        print(f"warning: --host {host}: the page is reachable from the network; anyone who can reach this machine "
              "can use it (and its CPU or GPU)")
    _, url, _ = app.launch(**launch_options(host, port))
    print(f"difflab serve: {path} on {url} (Ctrl-C to stop)", flush=True)
    try:
        _wait_for_ctrl_c()
        print("difflab serve: stopped")
    finally:
        app.close()


def _wait_for_ctrl_c() -> None:
    """Sleep until Ctrl-C (the command line turns SIGTERM into the same KeyboardInterrupt). launch() returned at
    once (prevent_thread_lock): the main thread waits here, where signals arrive, so the server closes cleanly."""
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
