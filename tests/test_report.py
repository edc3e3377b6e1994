"""`meml report` on recorded tiny runs (tests/fixtures/run_meml, run_grpo: metrics, config,
eval records and results of `meml train meml|grpo`, commands in their command.txt)."""

from __future__ import annotations

import base64
import html
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from meml.cli import main
from meml.cli.report_runs import draw_plots, equivalent_command, load_run
from meml.core.load import from_dict, load_config

FIXTURES = Path(__file__).parent / "fixtures"
ALL_FIGURES = {
    "reward.png",
    "zero_signal.png",
    "iml.png",
    "hsft.png",
    "eval_accuracy.png",
    "coverage.png",
    "overlong.png",
    "completion_len.png",
    "tokens_per_s.png",
    "loss.png",
    "sft_loss.png",
}


class Page(HTMLParser):
    """Images, links and external references of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "a":
            self.links.append(a["href"])


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """The recorded runs, copied so their reports are written outside the repository."""
    for name in ("run_grpo", "run_meml"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / "run_grpo", tmp_path / "run_meml"


def check_page(page_dir: Path) -> Page:
    """Every image the page shows names its PNG file, which exists and holds the same bytes;
    every PNG of the directory is shown; nothing is loaded from elsewhere."""
    text = (page_dir / "index.html").read_text()
    page = Page(text)
    shown = set()
    for img in page.images:
        file = img["data-file"]
        assert img["src"] == "data:image/png;base64," + base64.b64encode((page_dir / file).read_bytes()).decode()
        assert f'<a href="{file}">{file}</a>' in text  # named in the caption, linked to the file
        shown.add(file)
    assert shown == {p.name for p in page_dir.glob("*.png")}
    assert all(not link.startswith(("http:", "https:", "//")) for link in page.links)
    assert "<link" not in text and 'src="http' not in text
    return page


def test_report_pages_per_run_and_across_runs(runs, tmp_path, capsys):
    grpo, meml = runs
    out = tmp_path / "compare"
    assert main(["report", str(grpo), str(meml), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 3
    compare = check_page(out)
    assert {img["data-file"] for img in compare.images} == ALL_FIGURES
    # GRPO logs IML/HSFT metrics (as 0) but, with one expert, has no mixture coverage
    assert {p.name for p in (grpo / "report").glob("*.png")} == ALL_FIGURES - {"coverage.png"}
    check_page(grpo / "report")
    check_page(meml / "report")
    text = (out / "index.html").read_text()
    for run in (grpo, meml):  # the commands that produced each run, as recorded
        for line in (run / "command.txt").read_text().splitlines():
            assert line.startswith("meml train ") and html.escape(line) in text
    assert "acc/majority" in text and "coverage/gain" in text and "zero_signal_frac (last 6 steps)" in text


def test_runs_share_the_axes_of_each_panel(runs, tmp_path):
    plots = {p.file: p for p in draw_plots([load_run(r) for r in runs], tmp_path)}
    assert plots["reward.png"].panels == ["mean", "tutor", "algebraist", "checker"]
    assert plots["reward.png"].drawn["mean"] == ["run_grpo", "run_meml"]
    assert plots["reward.png"].drawn["tutor"] == ["run_grpo", "run_meml"]
    assert plots["reward.png"].drawn["algebraist"] == ["run_meml"]  # GRPO has one expert
    assert plots["coverage.png"].drawn["mixture"] == ["run_meml"]  # one expert: no mixture to compare
    assert "best expert" in plots["eval_accuracy.png"].panels


def test_equivalent_command_reproduces_the_config(runs):
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        argv = shlex.split(equivalent_command(config))
        assert argv[:2] == ["meml", "train"]
        assert load_config(None, argv[2:]) == from_dict(config)


def test_report_without_optional_files(runs, tmp_path):
    _, meml = runs
    for name in ("command.txt", "results.json", "samples.jsonl", "config.yaml"):
        (meml / name).unlink()
    assert main(["report", str(meml)]) == 0
    text = (meml / "report" / "index.html").read_text()
    assert "no command.txt" in text and "no config.yaml" in text
    check_page(meml / "report")
    assert main(["report", str(tmp_path / "nowhere")]) == 2  # not a run directory: an error, no traceback


def test_control_characters_from_the_model_are_dropped(runs):
    grpo, _ = runs
    assert main(["report", str(grpo)]) == 0
    text = (grpo / "report" / "index.html").read_text()
    assert "Sample completions" in text
    assert not any(ord(ch) < 32 and ch not in "\n\t\r" for ch in text)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_headless_without_errors(runs, tmp_path):
    out = tmp_path / "compare"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        (out / "index.html").as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    n = len(ALL_FIGURES)
    assert f'data-images-loaded="{n}/{n}"' in done.stdout  # every embedded PNG decoded
    assert "Final figures" in done.stdout
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no script errors, no failed loads
