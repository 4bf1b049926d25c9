import json

from rl_diffusion.cli import main

TINY = [
    "--dataset",
    "moons",
    "--steps",
    "60",
    "--num-timesteps",
    "10",
    "--hidden-size",
    "16",
    "--batch-size",
    "128",
    "--eval-every",
    "30",
    "--eval-samples",
    "200",
    "--final-samples",
    "500",
]


def test_two_by_two_ablation_runs_resumes_and_draws_the_grid(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "pretrain", "--param", "lr", "--values", "1e-3,3e-3", "--out", str(out), *TINY]
    assert main(args) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["values"] == [1e-3, 3e-3] and summary["cells"] == 4  # 2 values x 2 evaluations
    assert (out / "grid.png").stat().st_size > 5000 and (out / "curves.png").stat().st_size > 5000
    kept = (out / "lr=0.001" / "metrics.json").stat().st_mtime_ns
    for path in sorted((out / "lr=0.003").rglob("*"), reverse=True):  # delete one setting
        path.unlink() if path.is_file() else path.rmdir()
    (out / "lr=0.003").rmdir()
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "lr=0.001: ok (complete, skipped)" in err
    assert (out / "lr=0.001" / "metrics.json").stat().st_mtime_ns == kept
    assert (out / "lr=0.003" / "metrics.json").exists()
    assert json.loads((out / "ablation.json").read_text())["cells"] == 4


def test_unknown_param_and_bad_flags_are_user_errors(tmp_path, capsys):
    assert main(["ablate", "pretrain", "--param", "hiden_size", "--values", "1,2", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean 'hidden_size'" in capsys.readouterr().err
    assert main(["ablate", "pretrain", "--param", "hidden_size", "--values", "1,x", "--out", str(tmp_path / "a")]) == 2
    assert (
        main(["ablate", "pretrain", "--param", "lr", "--values", "1e-3", "--out", str(tmp_path / "a"), "--stepz", "3"])
        == 2
    )
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_an_algorithms_setting_is_ablatable_and_a_dict_field_is_not(tmp_path, capsys):
    out = str(tmp_path / "a")
    assert main(["ablate", "finetune", "--param", "explore_scale", "--values", "1,x", "--out", out]) == 2
    assert "--values for explore_scale" in capsys.readouterr().err  # a float of rtb's settings
    assert main(["ablate", "finetune", "--param", "eval_rewards", "--values", "{}", "--out", out]) == 2
    assert "is not an ablatable setting" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
