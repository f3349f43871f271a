"""`difflab serve`: the page's checks and generation as plain functions, the command line without a server, and one
real headless Chromium that fills in the page of a tiny class-conditional model, generates and reads the images."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import difflab
from difflab.cli import build_parser, main
from difflab.conditioning import TextConditioner
from difflab.denoisers import Denoiser, VPParameterization
from difflab.encoders import PixelEncoder
from difflab.errors import DifflabError
from difflab.models import Model, build, load_model, model_config
from difflab.nn import unet_config
from difflab.nn.text import ScratchTextEncoder
from difflab.schedules import make_schedule
from difflab.serve import MAX_IMAGES, build_app, check_settings, describe, generate_images, launch_options
from difflab.viz import to_pil

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian/Ubuntu apt packages


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A class-conditional tiny U-Net on the digits after 4 training steps (about 3 s): noise, but a real run folder
    with a checkpoint, ten class names and a trained null label (dropout 0.1)."""
    return difflab.train(steps=4, conditional=True, out=str(tmp_path_factory.mktemp("serve_runs")), batch_size=16,
                         log_every=2, sample_every=0, num_samples=4, sample_steps=2, warmup=1,
                         model={"base_channels": 16}, progress=False)


@pytest.fixture(scope="module")
def cond_model(cond_run):
    return load_model(cond_run, device="cpu")


@pytest.fixture(scope="module")
def plain_model():
    """An unconditional tiny model, built (untrained) from its config: enough for the page's checks."""
    config = model_config(unet_config("tiny", image_size=8, in_channels=1, base_channels=16),
                          parameterization=VPParameterization(make_schedule("linear", 1000)),
                          data={"name": "digits", "channels": 1, "image_size": 8})
    return build(config)


class ToyTextNet(nn.Module):
    """A network that reads its prompt: x * a + the mean of the real tokens' first channel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, c_noise, cond):
        m = (cond["tokens"][..., 0] * cond["mask"]).sum(1) / cond["mask"].sum(1)  # (N,)
        return x * self.a + m[:, None, None, None]


@pytest.fixture(scope="module")
def text_model():
    encoder = ScratchTextEncoder(["a", "red", "blue", "circle", "square"], max_length=4, width=16, layers=1, heads=2)
    denoiser = Denoiser(ToyTextNet(), VPParameterization(make_schedule("linear", 100)))
    config = {"unet": {"in_channels": 1, "image_size": 8}, "data": {"channels": 1, "image_size": 8}}
    return Model(denoiser, PixelEncoder(), TextConditioner(encoder, 0.1, ["a red circle"]), config)


# ---------------------------------------------------------------------------------------------------------
# The page's logic, without a browser


def test_defaults_come_from_the_model(cond_model, plain_model):
    got = check_settings(cond_model, num=2)
    assert got == {"sampler": "ddim", "steps": 50, "seed": 0, "per_row": 2, "guidance_scale": 3.0,
                   "classes": [str(k) for k in range(10)], "n": 2}  # class 'all': one row of 2 per class
    got = check_settings(cond_model, sampler="heun", steps=7.0, seed=5, num=3, guidance_scale=1.5, class_name="4")
    assert got == {"sampler": "heun", "steps": 7, "seed": 5, "per_row": None, "guidance_scale": 1.5,
                   "classes": ["4"], "n": 3}
    assert check_settings(plain_model, sampler="ddpm", num=4, guidance_scale=9, class_name="3") == {
        "sampler": "ddpm", "steps": 1000, "seed": 0, "per_row": None, "n": 4}  # no class, no guidance: ignored


@pytest.mark.parametrize("fields, fragment", [
    (dict(steps=0), "steps must be from 1 to 1000, got 0"),
    (dict(steps=100000), "steps must be from 1 to 1000, got 100000"),
    (dict(steps=2.5), "steps must be a whole number, got 2.5"),
    (dict(steps="many"), "steps must be a whole number, got 'many'"),
    (dict(seed=-1), "seed must be from 0 to 4294967295, got -1"),
    (dict(seed=None), "seed: enter a whole number"),
    (dict(num=0), f"number of images must be from 1 to {MAX_IMAGES}, got 0"),
    (dict(num=MAX_IMAGES + 1), f"number of images must be from 1 to {MAX_IMAGES}"),
    (dict(num=11, class_name="all"), "at most 100 images at a time: with 10 classes that is 10 per class, got 11"),
    (dict(class_name="cat"), "unknown class 'cat' (the model's classes: 0=0, 1=1"),
    (dict(guidance_scale=-1), "the guidance scale must be 0 or more"),
    (dict(guidance_scale=float("nan")), "the guidance scale must be 0 or more"),
    (dict(sampler="nope"), "unknown sampler 'nope' (choose from "),
])
def test_bad_settings_are_one_line_messages(cond_model, fields, fragment):
    with pytest.raises(DifflabError) as e:
        check_settings(cond_model, **{"num": 1, **fields})
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_prompts_for_a_text_model(text_model):
    for empty in (None, "", "   "):
        with pytest.raises(DifflabError, match="type a prompt: this is a text-to-image model"):
            check_settings(text_model, num=2, prompt=empty)
    got = check_settings(text_model, num=2, prompt=" a red circle ", negative_prompt=" ", class_name="7")
    assert got == {"sampler": "ddim", "steps": 50, "seed": 0, "per_row": None, "guidance_scale": 3.0,
                   "prompts": "a red circle", "n": 2}  # a blank negative prompt is none; no classes
    got = check_settings(text_model, num=2, steps=3, prompt="a red circle", negative_prompt="a blue square")
    made = generate_images(text_model, got)
    assert [im.size for im in made.images] == [(8, 8)] * 2 and made.captions == ["seed 0", "seed 1"]


def test_generate_images_matches_the_library(cond_model):
    settings = check_settings(cond_model, sampler="dpmpp_2m", steps=3, seed=5, num=3, class_name="7")
    made = generate_images(cond_model, settings)
    want = difflab.sample(cond_model, 3, classes="7", sampler="dpmpp_2m", steps=3, seed=5, guidance_scale=3.0)
    assert [im.tobytes() for im in made.images] == [im.tobytes() for im in to_pil(want * 2 - 1)]
    assert [(im.size, im.mode) for im in made.images] == [((8, 8), "L")] * 3
    assert made.captions == ["seed 5", "seed 6", "seed 7"]
    assert made.grid.size == (2 * 66 + 2, 2 * 66 + 2)  # 2 per row (ceil sqrt 3), 8x8 cells enlarged 8x, 2-px padding
    assert re.fullmatch(r"3 images · dpmpp\\_2m, 3 steps · 3 network evaluations \(NFE\) per image · "
                        r"\d+\.\d\d s \(\d+ ms/image\)", made.status), made.status

    every = generate_images(cond_model, check_settings(cond_model, steps=2, num=2, class_name="all"))
    assert len(every.images) == 20 and every.grid.size == (2 * 66 + 2, 10 * 66 + 2)  # one row of 2 per class
    assert every.captions[:3] == ["0 · seed 0", "0 · seed 1", "1 · seed 0"]


def test_library_warnings_reach_the_status_line(cond_model, monkeypatch):
    monkeypatch.setattr(cond_model.conditioner, "dropout", 0.0)  # as if trained without label dropout
    made = generate_images(cond_model, check_settings(cond_model, steps=2, num=1, class_name="1", guidance_scale=2))
    assert "⚠ this model was trained without dropping its condition" in made.status


def test_title_and_app(cond_model, cond_run):
    title = describe(cond_model, cond_run)
    assert str(cond_run) in title and "pixel model" in title and "eps-prediction" in title
    assert "1x8x8 images" in title and "10 classes: 0, 1, 2" in title
    app = build_app(cond_model, cond_run)
    ids = {block.elem_id for block in app.blocks.values()}
    assert {"sampler", "steps", "seed", "num-images", "class", "guidance-scale", "generate", "gallery", "status",
            "grid-file"} <= ids


# ---------------------------------------------------------------------------------------------------------
# The command line, without starting a server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_by_default_and_nothing_calls_out():
    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    options = launch_options(args.host, args.port)
    assert options["server_name"] == "127.0.0.1" and options["server_port"] == 7860
    assert options["share"] is False and options["ssr_mode"] is False and options["mcp_server"] is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_serve_command_launches_with_its_options(cond_run, monkeypatch, capsys):
    import gradio as gr

    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(kwargs)
        return None, f"http://{kwargs['server_name']}:{kwargs['server_port']}/", None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr("difflab.serve._wait_for_ctrl_c", lambda: None)  # Ctrl-C at once
    port = free_port()
    assert main(["serve", str(cond_run), "--port", str(port), "--device", "cpu"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == port and not launched["share"]
    out = capsys.readouterr().out
    assert f"on http://127.0.0.1:{port}/ (Ctrl-C to stop)" in out and "warning" not in out
    assert main(["serve", str(cond_run), "--host", "0.0.0.0", "--port", str(port), "--device", "cpu"]) == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert launched["server_name"] == "0.0.0.0" and len(warning) == 1 and "reachable from the network" in warning[0]


def test_missing_gradio_is_one_line(cond_run, monkeypatch, one_line):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    one_line(["serve", str(cond_run)], "difflab serve needs gradio", "pip install 'difflab[serve]'")


def test_old_gradio_is_one_line(cond_run, monkeypatch, one_line):
    import gradio as gr

    monkeypatch.setattr(gr, "__version__", "5.9.1")
    one_line(["serve", str(cond_run)], "difflab serve needs gradio 6 or newer, found 5.9.1", "pip install -U")


def test_port_in_use_is_one_line(cond_run, one_line):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line(["serve", str(cond_run), "--port", str(port)], f"cannot listen on 127.0.0.1:{port}",
                 f"--port {port + 1}")


# ---------------------------------------------------------------------------------------------------------
# A real browser on the real command


def start_server(run: Path, port: int, tmp: Path) -> subprocess.Popen:
    """`python -m difflab serve` in a subprocess (importing this difflab), once its port answers."""
    src = str(Path(difflab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "GRADIO_TEMP_DIR": str(tmp / "gradio")}  # Gradio's file cache: the test's folder, not /tmp/gradio
    command = [sys.executable, "-m", "difflab", "serve", str(run), "--port", str(port), "--device", "cpu"]
    with open(tmp / "serve.out", "w") as out, open(tmp / "serve.err", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"difflab serve exited with {proc.returncode}: {(tmp / 'serve.err').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("difflab serve did not open its port within 120 s")


def chrome():
    """Headless Chromium through Selenium: the apt packages' paths when they exist (no driver download), else
    whatever Selenium finds on its own (a laptop's Chrome)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    if CHROMIUM.exists():
        options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request, to check none leaves
    service = Service(str(CHROMEDRIVER)) if CHROMEDRIVER.exists() else Service()
    try:
        return webdriver.Chrome(options=options, service=service)
    except WebDriverException as e:
        pytest.fail("this test drives a headless Chromium: install it and its driver (apt-get install chromium "
                    f"chromium-driver) -- {str(e).splitlines()[0]}")


def test_the_page_in_a_real_browser(cond_run, cond_model, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    proc = start_server(cond_run, port, tmp_path)
    driver = None
    try:
        driver = chrome()
        wait = WebDriverWait(driver, 120, ignored_exceptions=[StaleElementReferenceException])  # Svelte re-renders
        url = f"http://127.0.0.1:{port}/"
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.ID, "generate"))

        def field(elem_id):
            return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")

        def type_number(elem_id, value):  # select what is there (Ctrl-A is Cmd-A on a Mac) and type over it
            box = field(elem_id)
            driver.execute_script("arguments[0].select()", box)
            box.send_keys(str(value))

        def choose(elem_id, value):  # a Gradio dropdown: open its list, click the option
            box = field(elem_id)
            box.click()
            option = f"li[id^='{box.get_attribute('aria-controls')}-option-'][aria-label='{value}']"
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, option))[0].click()
            wait.until(lambda d: field(elem_id).get_attribute("value") == value)

        def status():
            return driver.find_element(By.ID, "status").text

        assert "10 classes: 0, 1, 2" in driver.find_element(By.ID, "title").text
        assert field("steps").get_attribute("value") == "50" and field("sampler").get_attribute("value") == "ddim"
        choose("sampler", "ddpm")  # a sampler brings its default steps: all T = 1000 for DDPM's ancestral chain
        wait.until(lambda d: field("steps").get_attribute("value") == "1000")
        choose("sampler", "dpmpp_2m")
        wait.until(lambda d: field("steps").get_attribute("value") == "50")
        type_number("steps", 4)
        type_number("seed", 3)
        type_number("num-images", 3)
        choose("class", "7")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "NFE" in status() or "Error" in status())
        assert re.fullmatch(r"3 images · dpmpp_2m, 4 steps · 4 network evaluations \(NFE\) per image · "
                            r"\d+\.\d\d s \(\d+ ms/image\)", status()), status()

        # the gallery shows the 3 images as PNGs of the model's size, the very ones the library makes
        def gallery(count):  # the images' URLs once there are ``count`` of them
            sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
            return sources if len(sources) == count and all(sources) else None

        sources = wait.until(lambda d: gallery(3))
        shown = [Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())) for src in sources]
        assert [(im.format, im.size, im.mode) for im in shown] == [("PNG", (8, 8), "L")] * 3
        want = difflab.sample(cond_model, 3, classes="7", sampler="dpmpp_2m", steps=4, seed=3, guidance_scale=3.0)
        for im, ref in zip(shown, to_pil(want * 2 - 1)):  # another process: allow one grey level of rounding
            assert np.abs(np.asarray(im, dtype=int) - np.asarray(ref, dtype=int)).max() <= 1
        # the grid to download: 2 per row (ceil sqrt 3) of 8x8 cells enlarged to 64x64, 2-pixel padding
        link = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid-file a[href]"))[0].get_attribute("href")
        assert "difflab_dpmpp_2m_4steps_seed3.png" in link
        grid = Image.open(io.BytesIO(urllib.request.urlopen(link, timeout=30).read()))
        assert (grid.format, grid.size) == ("PNG", (134, 134))

        # a bad value: the message on the page, the old images gone
        type_number("steps", 0)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "Error" in status())
        assert status() == "Error: steps must be from 1 to 1000, got 0"
        assert wait.until(lambda d: gallery(0) is not None)
        assert "Traceback" not in driver.page_source

        # the page asked nothing of the internet: every request went to this server (or was inline data)
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
        assert urls and all(u.startswith((url, "data:", "blob:")) for u in urls), sorted(urls)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()  # SIGTERM: the command stops the server and exits 0
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "serve.err").read_text()[-2000:]
    assert "difflab serve: stopped" in (tmp_path / "serve.out").read_text()
