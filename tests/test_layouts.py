"""Same numbers across layouts: stage 1 on 2 nodes x 2 ranks (two torchrun agents, one per node, static
rendezvous) gives exactly the loss sequence of 1 node x 4 ranks with the same config. The global ranks, their
data shares and gloo's reduction order are the same; only LOCAL_RANK and each node's thread split differ. And in
finite epochs the 4 ranks and their workers read every training sample once per epoch."""
import subprocess

from dist_helpers import free_port
from test_epochs import all_keys, even, finite, keys_of, take  # noqa: F401 (even: a fixture)
from test_train import BIN, CONFIG, REPO, TINY, results

from lacvit_dist.data.pipeline import finite_epoch_plan

LAYOUT = [*TINY, "run.stages=[stage1]", "data.epoch_mode=finite", "stage1.steps_per_epoch=null",
          "stage1.micro_batch_size=32", "data.num_workers=1", "data.val_split=null"]


def torchrun(nodes: int, per_node: int, out, data, port: int) -> list[subprocess.Popen]:
    """One torchrun agent per node, all on this machine (static rendezvous: node k holds ranks k*per_node...)."""
    cmd = [str(BIN / "torchrun"), f"--nnodes={nodes}", f"--nproc_per_node={per_node}", "--master_addr=127.0.0.1",
           f"--master_port={port}"]
    train = [str(REPO / "train.py"), "--config", str(CONFIG), f"data.root={data}", f"run.output_dir={out}",
             f"run.name={nodes}x{per_node}", *LAYOUT]
    return [subprocess.Popen([*cmd, f"--node_rank={node}", *train], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                       "HOME": str(out)})
            for node in range(nodes)]


def test_two_nodes_of_two_ranks_give_the_losses_of_one_node_of_four(digits_root, tmp_path):
    runs = {}
    for nodes, per_node in ((1, 4), (2, 2)):
        agents = torchrun(nodes, per_node, tmp_path, digits_root, free_port())
        logs = [agent.communicate(timeout=600)[0] for agent in agents]
        assert all(agent.returncode == 0 for agent in agents), "\n".join(log[-3000:] for log in logs)
        runs[nodes] = results(tmp_path / f"{nodes}x{per_node}", "stage1")
    one, two = runs[1], runs[2]
    assert one["world_size"] == two["world_size"] == 4 and one["steps"] == two["steps"] > 4
    losses = [[entry["loss"] for entry in run["train_log"]] for run in (one, two)]
    assert len(losses[0]) == one["steps"] and losses[0] == losses[1]  # bitwise: same ranks, same reduction order


def test_four_ranks_and_their_workers_read_every_sample_once_per_epoch(even):  # noqa: F811
    plan = finite_epoch_plan(even, 4, 2, 4)
    per_rank = [keys_of(take(finite(even, 4, rank=rank, world_size=4, workers=2), 2 * plan.batches_per_rank))
                for rank in range(4)]
    for epoch in range(2):
        share = plan.batches_per_rank * 4
        union = [key for keys in per_rank for key in keys[epoch * share:(epoch + 1) * share]]
        assert len(union) == len(set(union)) and set(union) == all_keys(even)
