"""`gan-ddp demo`: the drawing behind the page, its refusals, and the page itself in a real browser (Debian's
chromium through Playwright): load it, choose a digit, press Generate, and check the image that comes back (its
size, its pixels against the same drawing done here, and that it changes with the seed).

`GAN_DDP_DEMO_RUN=RUN_DIR` points the browser test at a trained conditional run instead of its tiny one (how
docs/demo.png, the README's screenshot, was taken); `GAN_DDP_DEMO_SCREENSHOT=FILE` copies the screenshot there.
"""

from __future__ import annotations

import io
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _runs import REPO, base_env, free_port, single, train_cmd
from PIL import Image, ImageChops

from gan_ddp.tools import demo

CONDITIONAL = ("model.conditional=true", "train.steps=12", "checkpoint.every=12")
START_TIMEOUT_S = 240  # importing gradio and starting its server takes ~30 s on 2 busy cores


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> Path:
    if os.environ.get("GAN_DDP_DEMO_RUN"):
        return Path(os.environ["GAN_DDP_DEMO_RUN"])
    run = tmp_path_factory.mktemp("demo") / "run"
    result = single(train_cmd(run, *CONDITIONAL))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_drawing_sizes_digits_seeds_and_weights(cond_run) -> None:
    model = demo.from_run(cond_run)
    assert list(model.generators) == ["EMA", "raw"] and model.conditional
    assert "training steps" in model.facts and "FID" in model.facts
    picture = demo.sample_grid(model, 3, 16, "7", "EMA")
    assert picture.size == demo.grid_size(16, 4)
    assert demo.sample_grid(model, 0, 20, "all").size == demo.grid_size(20, 10)  # one column per digit
    assert _same(picture, demo.sample_grid(model, 3, 16, "7", "EMA"))
    assert not _same(picture, demo.sample_grid(model, 4, 16, "7", "EMA"))
    assert not _same(picture, demo.sample_grid(model, 3, 16, "1", "EMA"))
    assert not _same(picture, demo.sample_grid(model, 3, 16, "7", "raw"))
    assert demo.interpolation(model, 0, 1, 6, "7").size == demo.grid_size(6, 6)
    with pytest.raises(ValueError, match="seed must be a whole number"):
        demo.sample_grid(model, -1, 16)
    with pytest.raises(ValueError, match="images must be"):
        demo.sample_grid(model, 0, 0.5)


def test_an_exported_model_serves_its_one_generator(cond_run, tmp_path) -> None:
    folder = tmp_path / "export"
    assert single(["export", "--run", str(cond_run), "--out", str(folder)]).returncode == 0
    model = demo.from_export(folder)
    assert list(model.generators) == ["EMA"] and model.conditional
    assert _same(demo.sample_grid(model, 5, 9, "2"), demo.sample_grid(demo.from_run(cond_run), 5, 9, "2", "EMA"))


def test_without_gradio_the_demo_names_the_extra(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(
        demo.DemoError, match=r"demo needs gradio, which is not installed: pip install 'gan-ddp\[demo\]'"
    ):
        demo.check_gradio()


def test_bad_sources_are_one_line(tmp_path, cond_run) -> None:
    for args, needle in (
        (["--model", str(tmp_path)], "no config.json"),
        (["--run", str(tmp_path)], "config.yaml not found"),
        (["--model", str(tmp_path), "--checkpoint", str(tmp_path)], "--checkpoint goes with --run"),
        (["--run", str(cond_run), "--port", "70000"], "--port must be"),
    ):
        result = single(["demo", *args], timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert needle in lines[0]


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


class Server:
    """`gan-ddp demo` in a subprocess; `url` once it printed its address."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "gan_ddp", "demo", *args, "--port", str(self.port)]
        env = base_env(GRADIO_ANALYTICS_ENABLED="False")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_address()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+/?) \(this machine only", line)
            if found:
                return found.group(1)
        self.stop()
        pytest.fail("gan-ddp demo printed no address:\n" + "".join(self.output)[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _image(page, elem_id: str, previous: str | None) -> tuple[Image.Image, str]:
    """The PNG the page shows in #elem_id once its source differs from `previous`, fetched by the browser."""
    img = page.locator(f"#{elem_id} img")
    page.wait_for_function(
        "([sel, prev]) => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0"
        " && i.src !== prev; }",
        arg=[f"#{elem_id} img", previous or ""],
        timeout=60_000,
    )
    src = img.get_attribute("src")
    width, height = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    body = page.request.get(src).body()
    picture = Image.open(io.BytesIO(body))
    assert picture.format == "PNG" and picture.size == (width, height)
    return picture, src


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_in_a_real_browser(cond_run, tmp_path) -> None:
    from _browser import BrowserUnavailable, launch
    from playwright.sync_api import sync_playwright  # the dev extra: missing is a broken install, not a skip

    server = Server("--run", str(cond_run))
    try:
        with sync_playwright() as p:
            try:
                browser = launch(p)
            except BrowserUnavailable as exc:
                pytest.skip(f"no browser can start here: {exc}")
            page = browser.new_page(viewport={"width": 1100, "height": 1100})
            page.goto(server.url, wait_until="networkidle", timeout=120_000)
            assert "training steps" in page.locator("#facts").inner_text()

            page.locator("#digit input").click()  # the digit picker: choose 7
            page.get_by_role("option", name="7", exact=True).click()
            page.locator("#seed input").fill("3")
            page.locator("#generate").click()
            first, src = _image(page, "grid", None)

            model = demo.from_run(cond_run)
            assert first.size == demo.grid_size(16, 4)  # 16 sevens, 4 x 4, three times 28 px each
            assert _same(first, demo.sample_grid(model, 3, 16, "7", "EMA"))

            page.locator("#seed input").fill("4")
            page.locator("#generate").click()
            second, _ = _image(page, "grid", src)
            assert second.size == first.size and not _same(first, second)  # another seed, other sevens
            assert _same(second, demo.sample_grid(model, 4, 16, "7", "EMA"))

            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert Image.open(shot).size[0] >= 1000
            if os.environ.get("GAN_DDP_DEMO_SCREENSHOT"):
                shutil.copy(shot, os.environ["GAN_DDP_DEMO_SCREENSHOT"])
            browser.close()
    finally:
        server.stop()
