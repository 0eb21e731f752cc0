"""The shims over differences between supported torch releases: gradient checkpointing
(clip_ping/model/checkpointing.py) and leaving a process group (clip_ping.distributed.close_process_group)."""

import copy

import pytest
import torch

from clip_ping.distributed import close_process_group
from clip_ping.model.checkpointing import checkpoint_in_place
from clip_ping.model.losses import info_nce
from clip_ping.model.student import create_student, enable_grad_checkpointing

pytestmark = pytest.mark.floor


def _gradients(model, images, tokens):
    model.zero_grad()
    image, text = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    info_nce(image, text, model.logit_scale.exp()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_student_has_the_gradients_of_the_plain_one():
    """Every block recomputed in the backward pass, the text blocks with their causal mask (a keyword
    argument): the gradients are those of the model without checkpointing."""
    plain, _, _, tokenizer = create_student("ViT-XXS-8-64", seed=0)
    checkpointed = copy.deepcopy(plain)
    assert enable_grad_checkpointing(checkpointed) == 4 + 3
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    tokens = tokenizer(["a red circle", "two blue squares on grey", "a green triangle", "a small yellow star"])
    expected, got = _gradients(plain, images, tokens), _gradients(checkpointed, images, tokens)
    assert got.keys() == expected.keys() and len(got) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the mask matters: a text block recomputed without it would give other gradients
    block = checkpointed.transformer.resblocks[0]
    x = torch.randn(4, 32, 128)
    mask = checkpointed.attn_mask
    assert not torch.allclose(block(x, attn_mask=mask), block(x))


def test_checkpointing_keeps_parameter_names_and_copies_checkpoint_their_own_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    names = list(model.state_dict())
    checkpoint_in_place(model)
    assert list(model.state_dict()) == names
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(2)
    x = torch.randn(5, 3)
    twin(x).sum().backward()
    assert model[0].weight.grad is None and twin[0].weight.grad is not None  # the copy ran its own layers


def test_closing_without_a_process_group_does_nothing():
    assert not torch.distributed.is_initialized()
    close_process_group()
    close_process_group(clean_exit=False)


_TWO_PROCESS_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, ports):
    from clip_ping.distributed import joined_process_group
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    for port in ports.split(","):  # as a stage does: broadcasts from each process, then the group is left
        os.environ["MASTER_PORT"] = port
        with joined_process_group() as (me, world):
            assert (me, world) == (rank, 2)
            for owner in (0, 1):
                box = [rank] if rank == owner else [None]
                dist.broadcast_object_list(box, src=owner)
                buf = torch.full((1000,), float(rank)) if rank == owner else torch.empty(1000)
                dist.broadcast(buf, src=owner)
                assert box == [owner] and bool((buf == owner).all())
        assert not dist.is_initialized()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def test_a_stage_leaves_the_process_group_it_joined_after_broadcasts(tmp_path):
    """Two gloo processes join, broadcast both ways and leave the group, three times over: every
    process ends (a hang would time out), and each time the group is closed."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = ",".join(str(s.getsockname()[1]) for s in sockets)
    for s in sockets:
        s.close()
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), ports], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
