"""Fault injection, the fast cases: SIGKILL at random moments during `prep csv`, `train` and
`index build`, then resume, must give exactly what an uninterrupted run gives (shard bytes,
bitwise losses and weights on CPU fp32, index bytes); a disk filling up during a checkpoint save
stops the run with one line and loses nothing; a corrupt shard in the middle of a training stream
is counted and skipped. `bench/faults.py` runs the same scenarios 30+ times."""
import pytest

import fault_harness as harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder for the module: the synthetic training world is made once."""
    return tmp_path_factory.mktemp("faults")


@pytest.mark.parametrize("name, trials, kills", [("prep", 2, 1), ("train", 1, 2), ("index", 1, 1)])
def test_killed_runs_resume_to_the_uninterrupted_result(work, name, trials, kills):
    report = harness.kill_trials(harness.SCENARIOS[name](), work, trials=trials, seed=1, kills_per_trial=kills)
    assert report.failures == [] and report.identical == trials
    assert report.kills_landed >= 1  # at least one kill hit a running command
    if report.scenario == "index build":  # a rebuild over a finished index: it stays whole throughout
        assert report.whole_after_kill == trials * kills


def test_disk_full_during_a_checkpoint_save_loses_nothing(work):
    result = harness.disk_full_during_checkpoint(work)
    assert result["returncode"] == 2
    assert result["message"].startswith("mmssl: error: cannot save checkpoint")
    assert result["message"].endswith("File too large; nothing earlier was changed")
    assert result["temp_files_left"] == [] and result["previous_checkpoint_intact"]
    assert result["resumed_identical"]


def test_a_corrupt_shard_in_the_training_stream_is_counted_and_skipped(work):
    result = harness.corrupt_shard_in_training(work)
    assert result["returncode"] == 0 and result["steps"] == 30, result["stderr_tail"]
    # the first epoch reads all of the garbage shard except what falls past its last full batch
    assert result["corrupt_samples"] >= result["garbage_shard_samples"] - result["left_out_per_epoch"] > 0
