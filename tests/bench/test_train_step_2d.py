"""benchmarks/train_step.py --dims 2: SSL4MIS's 2D ACDC step, its CPU wiring on a synthetic ACDC set."""
import json

from benchmarks import train_step


def test_dims_2_times_our_2d_step_and_skips_the_3d_references(tmp_path, monkeypatch, capsys, trainer_on_cpu):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (train_step refuses the interpreter: meaningless times;
    # trainer_on_cpu: the fused ops' CPU path, as train_step's own process would take)
    out = tmp_path / "step.json"
    assert train_step.main(["--dims", "2", "--cpu", "--threads", "1", "--variants", "reference,ours", "--iters", "1",
                            "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["skipped"] == ["reference"] and [r["variant"] for r in result["rows"]] == ["ours"]
    assert "reference: skipped (the released trainer is 3D" in capsys.readouterr().out
    config = result["rows"][0]["config"]
    assert (config["dims"], config["num_classes"], tuple(config["patch"])) == (2, 4, (32, 32, 1))  # ACDC's 4 classes
    assert (config["batch_labeled"], config["batch_unlabeled"], result["labeled"]) == (2, 2, 2)
    assert result["floor"] is None and result["flops_per_iter"]["ours_eager"] > 0  # (the floor models the V-Net)
    assert train_step.parse_args(["--dims", "2"]).labeled == 14  # SSL4MIS's 7 labeled patients, both frames
    assert train_step.SIZES_2D == dict(patch=(256, 256, 1), n_filters=16, batch_labeled=12, batch_unlabeled=12)
