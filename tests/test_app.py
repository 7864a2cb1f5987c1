"""The web demo as people use it: in a real browser (Debian's headless Chromium under Playwright), through its API
with gradio_client, several requests at once, and with bad input. It serves the shipped pipelines."""

import io
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import app
from pipeline import cli, image_grid

CHROMIUM = os.environ.get("CHROMIUM", "/usr/lib/chromium/chromium-headless-shell")
# What the page asks for in the tests: the class-conditional model, a seven, the default sampler.
REQUEST = {"model": "ddpm-mnist-cond", "digit": "7", "num_images": 16, "steps": 20, "seed": 7}


@pytest.fixture(scope="module")
def url():
    """The demo, served from this process on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, local_url, _ = app.demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, theme=app.THEME)
    yield local_url
    app.demo.close()


@pytest.fixture(scope="module")
def page(url):
    """A headless Chromium page on the demo that refuses, and records, any request that leaves this machine."""
    if not os.path.isfile(CHROMIUM):
        pytest.fail(
            f"No headless Chromium at {CHROMIUM}: `apt-get install -y --no-install-recommends chromium "
            "chromium-headless-shell` (.ci/run does), or point CHROMIUM at one."
        )
    outside = []

    def local_only(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", local_only)
        page.goto(url)
        yield page
        browser.close()
    assert not outside, f"The page reached outside this machine: {outside}"


def sample_with_cli(
    tmp_path: Path, model: str, digit: str, num_images: int, steps: int, seed: int, *extra: str
) -> np.ndarray:
    """The digits `mnist-diffusion sample` draws for those settings (and `extra` flags)."""
    npz = tmp_path / f"{model}-{digit}-{seed}.npz"
    labels = [] if digit == app.ANY else ["--class_labels", digit]
    cli.main([
        "sample", "--model", str(Path(app.ROOT) / "pretrained" / model), "--num_images", str(num_images),
        "--seed", str(seed), "--num_inference_steps", str(steps), *labels, *extra, "--out", str(tmp_path / "grid.png"),
        "--npz", str(npz),
    ])  # fmt: skip
    return np.load(npz)["images"]


def pick(page, elem_id: str, option: str) -> None:
    """Choose an option of a Gradio dropdown as a person does: open it, click the option."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill(page, elem_id: str, value) -> None:
    """Type into a Gradio number or text box."""
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(value))


def generate(page) -> np.ndarray:
    """Click Generate and wait for new digits: the grid's pixels."""
    image = page.locator("#digits img")
    before = image.get_attribute("src") if image.count() else None  # an earlier test's digits may be showing
    page.locator("#generate").click()
    expect(image).to_have_attribute("src", re.compile(".+"), timeout=30_000)
    if before is not None:
        expect(image).not_to_have_attribute("src", before, timeout=30_000)
    return np.asarray(Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body())).convert("L"))


@pytest.mark.slow
def test_browser_draws_the_digits_mnist_diffusion_sample_draws(page, tmp_path, request):
    pick(page, "model", REQUEST["model"])
    pick(page, "digit", REQUEST["digit"])
    fill(page, "num_images", REQUEST["num_images"])
    fill(page, "seed", REQUEST["seed"])
    page.locator("#generate").click()
    image = page.locator("#digits img")
    expect(image).to_have_attribute("src", re.compile(".+"), timeout=30_000)
    response = page.request.get(image.get_attribute("src"))
    shown = np.asarray(Image.open(io.BytesIO(response.body())).convert("L"))
    expect(page.locator("#process img")).to_be_visible()

    digits = sample_with_cli(tmp_path, **REQUEST)
    expected = np.asarray(image_grid(digits, nrow=8, scale=3))
    np.testing.assert_array_equal(shown, expected)
    if request.config.getoption("--screenshot"):
        page.screenshot(path=request.config.getoption("--screenshot"), full_page=True)


@pytest.mark.slow
def test_browser_gives_a_distilled_model_its_own_sampler_and_steps(page, tmp_path):
    fast = Path(app.ROOT) / "pretrained" / "ddpm-mnist-fast"
    steps = json.loads((fast / "model_index.json").read_text())["default_num_inference_steps"]
    pick(page, "model", fast.name)
    expect(page.locator("#sampler input")).to_have_value("lcm")
    expect(page.locator("#steps input")).to_have_value(str(steps))
    fill(page, "num_images", 8)
    fill(page, "seed", 3)
    shown = generate(page)
    npz = tmp_path / "fast.npz"
    cli.main(["sample", "--model", str(fast), "--num_images", "8", "--seed", "3", "--out", str(tmp_path / "g.png"),
              "--npz", str(npz)])  # fmt: skip
    np.testing.assert_array_equal(shown, np.asarray(image_grid(np.load(npz)["images"], nrow=8, scale=3)))


@pytest.mark.slow
def test_browser_draws_from_a_prompt_what_the_cli_draws(page, tmp_path):
    pick(page, "model", "ddpm-mnist-text")
    expect(page.locator("#digit")).to_be_hidden()
    expect(page.locator("#clip_guidance")).to_be_hidden()  # a text model reads the prompt itself
    fill(page, "prompt", "a bold, right-slanted seven")
    fill(page, "num_images", 8)
    fill(page, "seed", 4)
    shown = generate(page)
    digits = sample_with_cli(tmp_path, "ddpm-mnist-text", app.ANY, 8, 20, 4, "--prompt", "a bold, right-slanted seven")
    np.testing.assert_array_equal(shown, np.asarray(image_grid(digits, nrow=8, scale=3)))


@pytest.mark.slow
def test_browser_shows_bad_input_as_a_message(page):
    fill(page, "num_images", 0)
    page.locator("#generate").click()
    expect(page.get_by_text(f"Ask for 1 to {app.MAX_DIGITS} digits (got 0)")).to_be_visible(timeout=15_000)
    assert "Traceback" not in page.content()


@pytest.fixture(scope="module")
def client(url):
    """The demo's API, as `gradio_client` users call it."""
    return Client(url, verbose=False)


def call(client: Client, model: str, digit: str, num_images: int, steps: int, seed: int, **changes):
    """The `/generate` endpoint with the page's defaults for the rest; returns the two pictures' files."""
    inputs = {"name": model, "digit": digit, "prompt": "", "num_images": num_images, "scheduler": "dpm++sde",
              "steps": steps, "guidance_scale": 2.0, "clip_guidance_scale": app.CLIP_GUIDANCE_SCALE, "seed": seed,
              **changes}  # fmt: skip
    return client.submit(*inputs.values(), api_name="/generate")


def tiles(grid: Image.Image, scale: int) -> np.ndarray:
    """The 28x28 digits of an `image_grid` picture (2 pixels of padding), row by row: (rows, columns, 28, 28)."""
    pixels = np.asarray(grid.convert("L"))[::scale, ::scale]
    rows, columns = (pixels.shape[0] - 2) // 30, (pixels.shape[1] - 2) // 30
    return np.stack([[pixels[2 + 30 * r : 30 * r + 30, 2 + 30 * c : 30 * c + 30] for c in range(columns)]
                     for r in range(rows)])  # fmt: skip


@pytest.mark.slow
def test_api_draws_the_same_digits(client, tmp_path):
    grid, process = call(client, **REQUEST).result(timeout=60)
    expected = image_grid(sample_with_cli(tmp_path, **REQUEST), nrow=8, scale=3)
    np.testing.assert_array_equal(np.asarray(Image.open(grid).convert("L")), np.asarray(expected))
    # A row per digit shown (8) and a column per step shown (20), each digit 28 pixels with 2 of padding, doubled.
    assert Image.open(process).size == ((20 * 30 + 2) * 2, (8 * 30 + 2) * 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ddpm-mnist", "ddpm-mnist-cond", "ddpm-mnist-fast"])
def test_the_denoising_picture_shows_every_step_and_ends_at_each_digit(client, model):
    folder = Path(app.ROOT) / "pretrained" / model
    steps = json.loads((folder / "model_index.json").read_text())["default_num_inference_steps"] or 20
    scheduler = "lcm" if model == "ddpm-mnist-fast" else "dpm++sde"
    digit = "3" if model == "ddpm-mnist-cond" else "any"
    grid, process = call(client, model, digit, 8, steps, 5, scheduler=scheduler).result(timeout=60)
    digits, frames = tiles(Image.open(grid), 3)[0], tiles(Image.open(process), 2)
    assert frames.shape[:2] == (8, min(steps, app.PROCESS_FRAMES))  # a row per digit, a column per step shown
    np.testing.assert_array_equal(frames[:, -1], digits)  # the last column is the digit drawn
    assert not np.array_equal(frames[:, 0], frames[:, -1])  # the first column is a noisy step, not the digit


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_images": 10_000}, f"Ask for 1 to {app.MAX_DIGITS} digits (got 10000)"),
        ({"steps": 51}, "Steps go from 1 to 50"),
        ({"guidance_scale": 0.5}, "guidance scale must be at least 1"),
        ({"prompt": "a seven", "clip_guidance_scale": -1}, "The CLIP guidance scale must be a number, 0 or more"),
        ({"name": "ddpm-mnist"}, "ddpm-mnist is unconditional"),
    ],
)
def test_api_refuses_bad_input_with_a_message(client, changes, message):
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(client, **{**REQUEST, "num_images": 2, **changes}).result(timeout=60)


def test_a_prompt_needs_a_text_encoder_or_a_clip():
    cond = app.load_pipeline(str(Path(app.ROOT) / "pretrained" / "ddpm-mnist-cond"))
    request = {"name": "ddpm-mnist-cond", "digit": app.ANY, "prompt": "a seven", "num_images": 1, "steps": 20,
               "guidance_scale": 2, "seed": 0, "clip_guidance_scale": 300}  # fmt: skip
    app.check_request(cond, **request, clip=True)
    with pytest.raises(app.gr.Error, match="ddpm-mnist-cond has no text encoder"):
        app.check_request(cond, **request, clip=False)


@pytest.mark.slow
def test_api_guides_a_model_without_text_by_the_clip_as_the_cli_does(client, tmp_path):
    settings = ("ddpm-mnist", app.ANY, 4, 10, 2)  # model, digit, digits, steps, seed
    grid, _ = call(client, *settings, prompt="a bold seven", clip_guidance_scale=500).result(timeout=60)
    clip = str(Path(app.ROOT) / "pretrained" / "mnist-clip")
    expected = sample_with_cli(tmp_path, *settings, "--prompt", "a bold seven", "--clip_model", clip,
                               "--clip_guidance_scale", "500")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(grid).convert("L")), np.asarray(image_grid(expected, 4, 3)))
    unguided, _ = call(client, *settings).result(timeout=60)
    assert not np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(unguided)))


@pytest.mark.slow
def test_requests_at_once_queue_and_all_complete(client, tmp_path):
    seeds = [1, 2, 3, 4]
    jobs = [call(client, "ddpm-mnist", app.ANY, 4, 5, seed) for seed in seeds]  # sent before any is done
    for seed, job in zip(seeds, jobs, strict=True):
        grid, _ = job.result(timeout=120)
        expected = image_grid(sample_with_cli(tmp_path, "ddpm-mnist", app.ANY, 4, 5, seed), nrow=4, scale=3)
        np.testing.assert_array_equal(np.asarray(Image.open(grid).convert("L")), np.asarray(expected))
    assert {fn.concurrency_limit for fn in app.demo.fns.values() if fn.api_name == "generate"} == {1}


def test_a_model_that_is_not_there_is_one_line_at_start_up(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "nope")])
    assert str(exit_info.value.code) == f"app.py: error: --model {tmp_path / 'nope'}: no such folder."
