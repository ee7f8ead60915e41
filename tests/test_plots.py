import torch

from pipeline.plots import plot_expert_usage, plot_groups


def test_plots_are_written(tmp_path):
    freqs = {
        "encoder.block.1.layer.1.mlp": torch.tensor([0.5, 0.5, 0, 0]),
        "decoder.block.1.layer.2.mlp": torch.tensor([1.0, 0, 0, 0]),
    }
    plot_expert_usage(freqs, tmp_path / "usage.png")
    groups = {
        "similarity": "router-logits",
        "ratio": "adaptive",
        "layers": {
            "encoder.block.1.layer.1.mlp": {"merged": False, "groups": [[0], [1], [2], [3]]},
            "decoder.block.1.layer.2.mlp": {"merged": True, "groups": [[0, 2, 3], [1]]},
        },
    }
    plot_groups(groups, tmp_path / "groups.png")
    for name in ("usage.png", "groups.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
