"""The demo app (`python -m backpack_jax.demo`), run as a server on the tiny preset: over HTTP
with gradio_client every control must give what the library functions give, bad input a
readable message; then in headless Chromium a user sees sense rows, a heatmap and tokens."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

from backpack_jax import (
    attribution,
    checkpoint,
    demo,
    generate,
    interventions,
    sense_table,
    senses,
    topic,
)
from backpack_jax.config import get_model_config
from backpack_jax.tokenizer import get_tokenizer, single_token, word_ids

gradio_client = pytest.importorskip("gradio_client", reason="pip install 'backpack-jax[demo]'")
AppError = gradio_client.exceptions.AppError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "The nurse said that"
SCREENSHOTS = os.environ.get("BACKPACK_DEMO_SCREENSHOTS")  # keep the browser's screenshots here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, random_params):
    """A tiny random checkpoint, of 80 positions: texts pad to 16 or 64 tokens, prompts to 16
    or 32 (which leaves room for the demo's 48 new tokens)."""
    root = tmp_path_factory.mktemp("demo")
    config = dataclasses.replace(get_model_config("tiny"), n_positions=80)
    params = random_params(config, 0)
    checkpoint.save(root / "ckpt", params, config)
    return root, params, config


@pytest.fixture(scope="module")
def server(tiny):
    """The app in a subprocess on a free port, and the topic cache it reads (written here while
    it compiles); it keeps its compiled code in the test's folder; SIGTERM must stop it
    cleanly."""
    root, params, config = tiny
    port = _free_port()
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "backpack_jax.demo", "--checkpoint", str(root / "ckpt"),
         "--port", str(port), "--topic_cache", str(root / "max_logits.npy"),
         "--compile_cache", str(root / "xla")],
        stdout=log, stderr=subprocess.STDOUT)
    max_VxK = topic.sense_max_logits(params, config, progress=False)
    np.save(root / "partial.npy", max_VxK)
    os.replace(root / "partial.npy", root / "max_logits.npy")
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            log.seek(0)
            assert proc.poll() is None, f"the demo exited:\n{log.read()}"
            assert time.monotonic() < deadline, f"the demo did not start:\n{log.read()}"
            time.sleep(0.5)
    assert os.listdir(root / "xla"), "start-up should fill the compilation cache"
    yield url, max_VxK
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
        log.seek(0)
        output = log.read()
        log.close()
    assert rc == 0, f"the demo did not shut down cleanly (rc {rc}):\n{output}"
    # Bad input is one line each; the only traceback is Gradio's own check of a number's range.
    assert output.count("Traceback") == output.count("gradio.exceptions.Error: 'Value "), output


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def _table(value) -> list[list]:
    return value["data"] if isinstance(value, dict) else value


def _generated(params, config, prompt_ids, n, edit, table=None, temperature=0.0, seed=0
               ) -> str:
    """The library's continuation, as the demo shows it: greedy, or sampled as the demo
    samples; with a sense table, read from it."""
    tokenizer = get_tokenizer()
    eot = tokenizer.eot_id
    if table is not None:
        edit = table.replace(then=edit)
    sampled = dict(temperature=temperature, top_k=demo.TOP_K, rng=jax.random.PRNGKey(seed)
                   ) if temperature else {}
    out = generate.generate(params, config, [prompt_ids], n, eos_id=eot, sense_edit=edit,
                            **sampled)
    new = [int(t) for t in out.tokens[0, len(prompt_ids):]]
    new = new[:new.index(eot)] if eot in new else new
    text = generate.TextStream(tokenizer)
    return PROMPT + "".join(text.push(t) for t in new) + text.flush()


def test_padding_keeps_the_real_positions(tiny):
    """The demo pads texts to fixed lengths; the model is causal, so alpha is unchanged."""
    root, params, config = tiny
    d = demo.Demo.load(str(root / "ckpt"), topic_cache=str(root / "unused.npy"))
    assert (d.text_lengths, d.prompt_lengths) == ([64], [32])
    ids = d.tokenizer.encode(PROMPT)
    S = len(ids)
    padded = senses.contextualization(params, config, d._padded(ids))[0, :, :S, :S]
    np.testing.assert_allclose(padded, senses.contextualization(params, config, ids)[0],
                               atol=1e-6)


def test_a_word_of_several_tokens_is_said(tiny):
    """A word of several tokens is used with a note of its tokens; a word needed as one token
    is refused with the same tokens."""
    root, params, config = tiny
    d = demo.Demo(params, config, topic_cache=str(root / "unused.npy"))
    assert d.several_tokens("nurse", "using its first token") == ""
    tokens = "' xyzzyplugh' is 5 tokens (' x', 'y', 'zzy', 'pl', 'ugh')"
    assert d.several_tokens("xyzzyplugh", "using its first token") == (
        f"{tokens}: using its first token")
    with pytest.raises(ValueError) as refused:
        single_token("xyzzyplugh", d.tokenizer, "the target")
    assert str(refused.value) == f"{tokens}; the target must be one token"


def test_contributions_are_rounded_for_display(tiny):
    root, params, config = tiny
    d = demo.Demo(params, config, topic_cache=str(root / "unused.npy"))
    a = d.attribute(PROMPT, -1)
    want = attribution.top_terms(a, demo.TOP_TERMS)
    shown = [row[3] for row in d.term_rows(a)]
    np.testing.assert_allclose(shown, [v for *_, v in want], rtol=10 ** (1 - demo.DIGITS))
    assert shown == [float(f"{v:.{demo.DIGITS}g}") for v in shown], shown  # Nothing more.


def test_the_prompt_limit_names_the_tokens_asked(tiny):
    root, params, config = tiny
    d = demo.Demo(params, config, topic_cache=str(root / "unused.npy"))
    with pytest.raises(ValueError, match=r"the prompt is 40 tokens; this model takes at most 32,"
                                         r" whatever the number of new tokens \(20 asked\)"):
        d.prompt_ids(" a" * 40, 20)


def test_bad_input_is_one_line_on_stderr(capsys):
    assert demo.bad_input("steer", ValueError("the word is empty")) == (
        "**Error:** the word is empty")
    assert capsys.readouterr().err == "steer: bad input: the word is empty\n"


def test_only_the_chosen_interventions_controls_show():
    assert [demo.shown_interventions(k) for k in demo.INTERVENTIONS] == [
        [True, False, False], [False, True, False], [False, False, True]]


def test_without_the_sense_table(tiny):
    """`--no_sense_table`: the panes are the sense network's own generation."""
    root, params, config = tiny
    d = demo.Demo(params, config, topic_cache=str(root / "unused.npy"))
    edit = d.scale_edit("nurse", d.default_sense, 0.0)
    ids = d.tokenizer.encode(PROMPT)
    *_, last = d.side_by_side(PROMPT, 10, edit, 0.9, seed=5)
    assert last == (_generated(params, config, ids, 10, None, None, 0.9, 5),
                    _generated(params, config, ids, 10, edit, None, 0.9, 5))


@pytest.mark.slow
def test_controls_match_the_library(tiny, server, client):
    _, params, config = tiny
    max_VxK = server[1]
    tokenizer = get_tokenizer()

    rows, status = client.predict("nurse", "first", api_name="/senses")
    rows = _table(rows)
    assert status == ""
    ws = senses.word_senses(params, config, "nurse", tokenizer)
    table = senses.format_sense_table(
        senses.project_senses(params, ws.senses_KxD, top=demo.TOP_WORDS,
                              vocab_limit=tokenizer.n_vocab), tokenizer)
    expected = [[cell.strip() for cell in line.split(" | ")] for line in table.splitlines()[2:]]
    assert [[str(c).strip() for c in row] for row in rows] == expected
    assert len(rows) == config.num_senses

    image, _ = client.predict(PROMPT, [0, 1], api_name="/heatmaps")
    with open(image, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    headline, grid, terms, _ = client.predict(PROMPT, -1, "", api_name="/attribute")
    a = attribution.attribute(params, config, tokenizer.encode(PROMPT), -1)
    assert f"= {a.logit:.4f}" in headline and os.path.exists(grid)
    got = _table(terms)
    want = attribution.top_terms(a, demo.TOP_TERMS)
    assert [(int(r[1]), int(r[2])) for r in got] == [(j, k) for j, k, _ in want]
    np.testing.assert_allclose([float(r[3]) for r in got], [v for *_, v in want],
                               rtol=10 ** (1 - demo.DIGITS))

    ids = tokenizer.encode(PROMPT)
    table = sense_table.build(params, config)
    sense = min(demo.PAPER_SENSE, config.num_senses - 1)
    nurse = word_ids("nurse", tokenizer)
    bag, _ = topic.bag_token_ids(topic.TOPICS["sports"], tokenizer)
    edits = {
        "scale a sense": interventions.scale_senses(config, {t: {sense: 0.0} for t in nurse}),
        "topic": topic.topic_control(params, config, bag, 3, max_logits_VxK=max_VxK,
                                     zero_from=tokenizer.eot_id, progress=False),
        "knowledge edit": interventions.knowledge_edit(
            params, config, word_ids("nurse", tokenizer),
            *(word_ids(w, tokenizer)[0] for w in ("said", "cat"))),
    }
    for temperature, seed in ((0.0, 0), (0.8, 3)):
        plain = _generated(params, config, ids, 12, None, table, temperature, seed)
        for kind, edit in edits.items():
            job = client.submit(PROMPT, 12, kind, "nurse", sense, 0.0, "sports", 3, "nurse",
                                "said", "cat", temperature, seed, api_name="/steer")
            want = (plain, _generated(params, config, ids, 12, edit, table, temperature, seed))
            assert tuple(job.result()) == (*want, ""), (kind, temperature)
            assert len(job.outputs()) > 1, "the panes should stream"


@pytest.mark.slow
@pytest.mark.parametrize("endpoint, args, message", [
    ("/senses", ("  ", "first"), "the word is empty"),
    ("/steer", (PROMPT, 5, "scale a sense", "nurse", 99, 0.0, "sports", 1, "a", "b", "c", 0, 0),
     "sense index 99 is out of range"),
    ("/attribute", (" a" * 200, -1, ""), "n_positions=80"),
    ("/attribute", (PROMPT, 7, ""), "position 7 is outside"),
    ("/steer", (PROMPT, 5, "knowledge edit", "nurse", 0, 0.0, "sports", 1, "nurse",
                "xyzzyplugh", "cat", 0, 0), "the word to remove must be one token"),
])
def test_bad_input_is_a_message_and_the_server_keeps_serving(tiny, client, endpoint, args,
                                                             message):
    """The message stays in the control's status line and its other outputs are cleared; the
    server logs it as one line."""
    if endpoint == "/steer":
        *outputs, status = client.submit(*args, api_name=endpoint).result()
    else:
        *outputs, status = client.predict(*args, api_name=endpoint)
    assert status.startswith("**Error:** ") and message in status, status
    log = tiny[0] / "server.log"
    deadline = time.monotonic() + 10
    def lines():  # progress bars may leave part of a character behind
        return log.read_text(errors="replace").splitlines()

    while not any(": bad input: " in x and message in x for x in lines()):
        assert time.monotonic() < deadline, lines()
        time.sleep(0.2)
    assert all(not _table(o) for o in outputs), outputs
    assert _table(client.predict("nurse", "first", api_name="/senses")[0])


@pytest.mark.slow
def test_gradios_own_range_check(client):
    with pytest.raises(AppError, match="less than minimum value 0"):
        client.submit(PROMPT, 5, "scale a sense", "nurse", 0, 0.0, "sports", 1, "a", "b", "c",
                      -1, 0, api_name="/steer").result()


@pytest.mark.slow
def test_a_word_of_several_tokens_is_noted(client):
    rows, status = client.predict("xyzzyplugh", "mean", api_name="/senses")
    assert _table(rows) and status == ("' xyzzyplugh' is 5 tokens (' x', 'y', 'zzy', 'pl', "
                                       "'ugh'): the mean of its tokens' senses"), status


@pytest.mark.slow
def test_in_a_browser(tiny, tmp_path, request):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        # In CI (the variable CI set) a missing browser is a failure, elsewhere a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"this test needs headless Chromium at {CHROMIUM} and {CHROMEDRIVER}: "
            "apt-get install chromium chromium-driver (.ci/run does)")
    server = request.getfixturevalue("server")  # Started only when the browser is there.
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install 'backpack-jax[demo]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, config = tiny
    shots = SCREENSHOTS or str(tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 60)

    def type_into(elem_id, text):
        box = wait.until(lambda d: d.find_elements(
            By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input"))[0]
        box.clear()
        box.send_keys(text)

    def tab(name):
        driver.find_element(By.XPATH, f"//button[@role='tab'][contains(., '{name}')]").click()

    try:
        driver.get(server[0])
        type_into("word", "nurse")
        driver.find_element(By.ID, "lookup").click()
        first_cells = "#senses [role=gridcell][data-col='0']"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, first_cells))
                   == config.num_senses)
        driver.save_screenshot(os.path.join(shots, "senses.png"))

        tab("Contextualization")
        type_into("text", PROMPT)
        driver.find_element(By.ID, "show_alpha").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#alpha img"))
        driver.save_screenshot(os.path.join(shots, "contextualization.png"))

        tab("Steer")
        type_into("prompt", PROMPT)
        driver.find_element(By.ID, "generate").click()

        def pane(elem_id):
            return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute(
                "value")

        wait.until(lambda d: len(pane("plain")) > len(PROMPT) and len(pane("edited")) > len(
            PROMPT))
        assert pane("plain").startswith(PROMPT) and pane("edited").startswith(PROMPT)
        driver.save_screenshot(os.path.join(shots, "steer.png"))
    finally:
        driver.quit()
