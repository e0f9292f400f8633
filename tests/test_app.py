"""The demo page (issue 17 item 4): ``gridclip_tools.app`` without Gradio (its detect step, its
errors), and, slow-marked, the page itself in a real headless Chromium driven by Selenium
(skipped cleanly when Gradio, Selenium or the browser are missing: ``make app`` / ``apt-get
install chromium chromium-driver``)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from gridclip_tools import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(ci_demo, name="gridclip"):
    run = next(m for m in ci_demo["models"] if m["name"] == name)
    weights = os.path.join(ci_demo["output_dir"], name, "model_final.pth")
    return run["config"], weights, list(run["opts"])


@pytest.fixture(scope="module")
def session_and_examples(ci_demo):
    import torch

    from gridclip.engine.predictor import OpenVocabularyPredictor

    torch.set_num_threads(1)
    config, weights, opts = _run(ci_demo)
    predictor = OpenVocabularyPredictor.from_config_file(config, weights, opts)
    examples = app.example_images(predictor.cfg, None, 2)
    return app.DemoSession(predictor), examples


def test_session_detects_with_prompt_vocabulary_and_default(session_and_examples):
    from PIL import Image

    session, examples = session_and_examples
    assert len(examples) == 2
    path, caption = examples[0]
    assert os.path.isfile(path) and caption.startswith(("a ", "an ", "two ", "three "))
    rgb = np.asarray(Image.open(path).convert("RGB"))

    drawing, result = session.detect(rgb, vocabulary="world_novel", prompt=caption, threshold=0)
    assert drawing.dtype == np.uint8 and drawing.ndim == 3
    assert result["prompt"]["text"] == caption  # the prompt wins over the vocabulary
    assert result["detections"] and all("phrase" in d for d in result["detections"])
    for d in result["detections"]:
        assert caption[d["span"][0] : d["span"][1]] == d["phrase"]

    _, result = session.detect(rgb, vocabulary="red star, blue ring", prompt="  ", threshold=0)
    assert result["prompt"] is None
    assert result["vocabulary"]["class_names"] == ["red star", "blue ring"]
    assert all("phrase" not in d for d in result["detections"])
    _, result = session.detect(rgb[:, :, :1].squeeze(-1), threshold=0.5)  # grey: trained vocab
    assert len(result["vocabulary"]["class_names"]) == 48
    assert all(d["score"] >= 0.5 for d in result["detections"])

    for kwargs, needle in [
        ({"image_rgb": None}, "no image"),
        ({"image_rgb": rgb, "prompt": " . . "}, "no phrase"),
        ({"image_rgb": rgb, "vocabulary": " , "}, "empty"),
        ({"image_rgb": rgb, "threshold": 1.5}, "between 0 and 1"),
    ]:
        with pytest.raises(ValueError, match=needle):
            session.detect(**kwargs)


def test_app_errors_without_gradio_or_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    with pytest.raises(ImportError, match="make app"):
        app.build_app(session=None)
    with pytest.raises(SystemExit) as e:
        app.main(["--weights", str(tmp_path / "none.pth")])
    assert e.value.code == 2 and "make app" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "gradio")
    pytest.importorskip("gradio")
    for args, needle in [
        (["--weights", str(tmp_path / "none.pth")], "none.pth"),
        (["--threshold", "nan"], "between 0 and 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            app.main(args)
        assert e.value.code == 2 and needle in capsys.readouterr().err, args


# ------------------------------------------------------------------------- in a real browser
def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_page_in_headless_chromium(ci_demo, tmp_path):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _browser(), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no Chromium + chromedriver (apt-get install -y chromium chromium-driver)")

    config, weights, opts = _run(ci_demo)
    port = _free_port()
    cmd = [sys.executable, os.path.join(ROOT, "tools/app.py"), "--config-file", config]
    cmd += ["--weights", weights, "--port", str(port), "--num-examples", "2"]
    cmd += ["--threshold", "0"] + opts
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "app.log", "w")
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1400")
    driver = None
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the page did not come up in 10 minutes"
                time.sleep(2)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        wait = WebDriverWait(driver, 300)
        driver.get(url)
        # pick the first example: it fills the image and its caption
        cell = '#examples [data-testid="dataset-cell-0-0"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, cell))[0].click()
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        wait.until(lambda d: prompt.get_attribute("value"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        # type a prompt of our own, and detect
        typed = "a red star beside two blue rings. "  # caption sentence (one '.' segment)
        prompt.clear()
        prompt.send_keys(typed)
        driver.find_element(By.CSS_SELECTOR, "#detect").click()
        wait.until(lambda d: "detections >=" in d.find_element(By.CSS_SELECTOR, "#status").text)
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        assert "caption prompt, 2 phrases" in status, status
        text = driver.find_element(By.CSS_SELECTOR, "#json").text
        assert '"phrase"' in text and '"span"' in text, text[:2000]
        assert '"blue rings"' in text or '"red star"' in text, text[:2000]
        assert driver.find_elements(By.CSS_SELECTOR, "#drawing img")  # the drawing is shown
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
