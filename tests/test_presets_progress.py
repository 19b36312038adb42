"""Every command's progress bar: one label style (``command`` or ``command/what``) and ``step n/total``."""

import pytest

from alignflow.trainers import loop


def test_bar_reads_label_step_n_of_total(capsys):
    bar = loop.Progress(3, 1, True, loop.bar_label("rl", "grpo"))
    bar.update(10, loss=0.5)
    bar.update(10, loss=0.25)
    bar.close()
    err = capsys.readouterr().err
    assert "rl/grpo step 3/3 |" in err and "loss=0.25" in err and "tok/s=" in err


def test_a_label_outside_the_style_is_refused():
    assert loop.bar_label("rm", "bt", "") == "rm/bt"
    for bad in ("po dpo", "rm runs-rm", "train/sft"):
        with pytest.raises(ValueError):
            loop.Progress(1, 0, False, bad)


def test_stages_of_a_composite_command_carry_its_name():
    """mpo runs the po and rl trainers; their bars read mpo/dpo and mpo/ppo, and plain po is po/dpo again."""

    @loop.bar_command("mpo")
    def stages():
        return [loop.Progress(1, 0, False, loop.bar_label(c, m)).label for c, m in (("po", "dpo"), ("rl", "ppo"))]

    assert stages() == ["mpo/dpo", "mpo/ppo"]
    assert loop.Progress(1, 0, False, "po/dpo").label == "po/dpo"


def test_evaluation_bar_leaves_ctrl_c_alone(capsys):
    """interrupt=False: no deferred Ctrl-C (evaluation writes no checkpoint); the count is in policies."""
    from alignflow.trainers import run_dir

    bar = loop.Progress(2, 0, True, "eval", unit="policy", interrupt=False)
    assert not any(ref() is bar for ref in run_dir._STATE.owners)
    bar.update(0)
    bar.close()
    assert "eval policy 1/2 |" in capsys.readouterr().err
