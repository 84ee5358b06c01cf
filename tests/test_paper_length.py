"""benchmarks/paper_length.py: a run's progress saved on one machine is resumed on another, and
never overwrites a run that has its own checkpoint."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_length  # noqa: E402


def test_progress_saved_and_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_length, "PROGRESS", tmp_path / "progress")
    work = tmp_path / "work"
    (work / "dense").mkdir(parents=True)
    (work / "dense" / "checkpoint.pt").write_bytes(b"epoch 17")
    (work / "dense" / "metrics.jsonl").write_text("{}\n")
    paper_length.save_progress(work)
    assert (tmp_path / "progress" / "dense" / "checkpoint.pt").read_bytes() == b"epoch 17"
    assert not (tmp_path / "progress" / "svd_training").exists()  # no run there: nothing saved
    other = tmp_path / "other_machine"
    paper_length.restore_progress(other / "dense")
    assert (other / "dense" / "checkpoint.pt").read_bytes() == b"epoch 17"
    assert (other / "dense" / "metrics.jsonl").read_text() == "{}\n"
    (other / "dense" / "checkpoint.pt").write_bytes(b"epoch 30")  # it went on: a restore keeps it
    paper_length.restore_progress(other / "dense")
    assert (other / "dense" / "checkpoint.pt").read_bytes() == b"epoch 30"
