"""The objective layer: every method is an `Objective` the trainer drives through one interface."""

import pytest
import torch

from clip_ping.objectives import OBJECTIVES, ClipObjective, Objective, StepContext
from clip_ping.objectives.sources import DatasetNeighbors
from clip_ping.trainer import TrainConfig, Trainer, _objective_state_of_v1


def test_every_method_choice_is_a_registered_objective():
    from clip_ping.config import from_dict

    assert set(OBJECTIVES) >= {"clip", "clip-ping"}
    for name in OBJECTIVES:
        assert from_dict(TrainConfig, {"method": name}).method == name


def test_plain_clip_objective_is_the_symmetric_infonce_with_its_terms_logged():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    v = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    out = ClipObjective().loss(u, v, {"index": torch.arange(6)}, StepContext(step=0, logit_scale=torch.tensor(10.0)))
    logits = 10.0 * u @ v.T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(6))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(out["loss"], expected) and set(out) == {"loss", "loss_clip"}


def test_grad_share_scales_the_gradient_but_not_the_value():
    s = torch.tensor(3.0, requires_grad=True)
    shared = StepContext(step=0, logit_scale=s, grad_share=0.25).share(s * 2)
    shared.backward()
    assert float(shared.detach()) == 6.0 and float(s.grad) == pytest.approx(0.5)


def test_dataset_neighbours_draw_the_same_neighbours_for_the_same_step():
    class Table:
        k = 3

        def pick(self, index, top_k, generator):
            return torch.randint(0, 100, (len(index),), generator=generator), index

    source = DatasetNeighbors(Table(), top_k=3, seed=5)
    index = torch.arange(8)
    assert torch.equal(source.pick(index, 7)[0], source.pick(index, 7)[0])
    assert not torch.equal(source.pick(index, 7)[0], source.pick(index, 8)[0])


def test_the_trainer_holds_no_method_state(tiny_synth, tmp_path):
    cfg = TrainConfig(data=str(tiny_synth), out=str(tmp_path / "run"), method="clip", batch_size=8, steps=1,
                      workers=0, progress=False, tensorboard=False)
    trainer = Trainer(cfg)
    assert isinstance(trainer.objective, Objective)
    assert not any(hasattr(trainer, name) for name in ("banks", "neighbors", "queue", "guidance", "student_memory"))


def test_a_checkpoint_of_another_method_is_refused_with_the_setting_named(tiny_synth, tmp_path):
    from clip_ping.errors import ConfigError

    cfg = dict(data=str(tiny_synth), out=str(tmp_path / "run"), batch_size=8, steps=1, workers=0, progress=False,
               tensorboard=False)
    trainer = Trainer(TrainConfig(method="clip", **cfg))
    state = trainer.state_dict()
    state["method"] = "clip-ping"
    with pytest.raises(ConfigError, match="--method clip-ping.*--method clip"):
        trainer.load_state_dict(state)


def test_checkpoints_written_before_objectives_map_onto_the_heads():
    weight = torch.ones(2, 3)
    state = {"guidance": {"image_head.weight": weight}, "queue": {"ptr": 1}, "student_memory": None}
    converted = _objective_state_of_v1(state)
    assert converted["heads.image_head.weight"] is weight
    assert converted["_extra_state"] == {"source": {"ptr": 1}, "targets": None}
    assert _objective_state_of_v1({"guidance": None}) == {}
