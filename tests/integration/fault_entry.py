"""``accelerate launch -m tests.integration.fault_entry key=value ...``: distsft.train with a real fault injected
on one rank, for the failure tests (a monkeypatch cannot reach launched processes).

    DISTSFT_TEST_FAULT=save_oserror   the main process's flush of a checkpoint raises ENOSPC (rank 0), as a full disk
                                      would while it finishes a checkpoint and the other ranks wait for it
    DISTSFT_TEST_FAULT=stop_self      the rank SIGSTOPs itself in its DISTSFT_TEST_FAULT_CALL-th forward, 3 s in
                                      (a frozen node)
    DISTSFT_TEST_FAULT=other_data     the rank's prepared data carries another fingerprint (another token cache)
    DISTSFT_TEST_FAULT=drop_moments   a resharded resume loads zero Adam moments (one process; a negative control)
    DISTSFT_TEST_FAULT=uneven_samples this rank's sample replies run to logging.sample_max_new_tokens (no early eos):
                                      the ranks' greedy replies end at different lengths
    DISTSFT_TEST_FAULT=kill_mid_write the rank's background writer (trainer.async_save) of checkpoint step_6, having
                                      copied one file, SIGKILLs the launcher and the rank (the others die with the
                                      launcher): a node lost while the checkpoint is being written
    DISTSFT_TEST_FAULT=slow_commit    the main process takes DISTSFT_TEST_FAULT_SLEEP (default 6) s more to complete
                                      each checkpoint (a large checkpoint on a slow filesystem)
    DISTSFT_TEST_FAULT=no_replica_mean (every rank) all-reduces over a group of ranks that are not neighbours
                                      (HSDP's replicas: ranks r and r + dp_shard_size) do nothing: the replicas'
                                      gradients are not averaged (a negative control)
    DISTSFT_TEST_FAULT=tp_rows_apart  (every rank) the odd ranks, the second rank of each tensor-parallel pair, read
                                      their rows' tokens shifted by one position (same shapes, other tokens): the
                                      ranks of a tp group compute on different inputs (a negative control)
"""

from __future__ import annotations

import errno
import os

if __name__ == "__main__":
    import distsft.trainer.checkpoint as checkpoint
    from distsft.train import main

    if os.environ.get("DISTSFT_TEST_FAULT") == "no_replica_mean":
        import torch.distributed as dist

        all_reduce = dist.all_reduce

        def not_across_replicas(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            ranks = dist.get_process_group_ranks(group) if group is not None and group != dist.group.WORLD else []
            if len(ranks) > 1 and ranks[1] - ranks[0] > 1:  # the replicate dimension of the 2-D mesh
                return None
            return all_reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = not_across_replicas
    if os.environ.get("DISTSFT_TEST_FAULT") == "tp_rows_apart" and int(os.environ.get("RANK", "0")) % 2:
        import distsft.data.loader as loader

        steps = loader.StepLoader.steps

        def shifted_steps(self, epoch, start_step=0):
            for group in steps(self, epoch, start_step):
                yield [{**mb, "input_ids": mb["input_ids"].roll(1, dims=-1)} for mb in group]

        loader.StepLoader.steps = shifted_steps
    if os.environ.get("RANK") == os.environ.get("DISTSFT_TEST_FAULT_RANK", "0"):
        if os.environ.get("DISTSFT_TEST_FAULT") == "save_oserror":
            def full_disk(directory, *args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

            checkpoint._fsync_tree = full_disk
        if os.environ.get("DISTSFT_TEST_FAULT") == "stop_self":
            import signal

            import distsft.trainer.step as step

            forward, calls, at = step.forward_losses, [0], int(os.environ.get("DISTSFT_TEST_FAULT_CALL", "3"))

            def freeze(model, batch):
                calls[0] += 1
                if calls[0] == at:
                    import time

                    time.sleep(3)  # a beat (every 2 s at hang_timeout=10) publishes where it is: steps are faster here
                    os.kill(os.getpid(), signal.SIGSTOP)
                return forward(model, batch)

            step.forward_losses = freeze
        if os.environ.get("DISTSFT_TEST_FAULT") == "other_data":
            import distsft.run as run

            build = run.build_data

            def other(*args, **kwargs):
                parts = build(*args, **kwargs)
                parts.data.fingerprint = "0" * len(parts.data.fingerprint)
                return parts

            run.build_data = other
        if os.environ.get("DISTSFT_TEST_FAULT") == "drop_moments":
            import torch

            import distsft.trainer.reshape as reshape

            view_of = reshape.universal_view

            def without_moments(acc, ckpt):
                view = view_of(acc, ckpt)
                for f in list(view.rglob("exp_avg.pt")) + list(view.rglob("exp_avg_sq.pt")):
                    state = torch.load(f, weights_only=False)
                    state["param"] = torch.zeros_like(state["param"])
                    torch.save(state, f)
                return view

            reshape.universal_view = without_moments
        if os.environ.get("DISTSFT_TEST_FAULT") == "uneven_samples":
            import distsft.trainer.samples as samples

            reply = samples.greedy_reply

            def longer(model, tokenizer, prompt, max_new_tokens, device=None, **kwargs):
                return reply(model, tokenizer, prompt, max_new_tokens, device, min_new_tokens=max_new_tokens, **kwargs)

            samples.greedy_reply = longer
        if os.environ.get("DISTSFT_TEST_FAULT") == "kill_mid_write":
            import signal

            import distsft.trainer.async_save as async_save

            copy, copied = async_save.copy_with_crc, [0]

            def copy_then_die(src, dst):
                crc = copy(src, dst)
                copied[0] += ".step_6.tmp" in str(dst)
                if copied[0] == 1:
                    os.kill(os.getppid(), signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)
                return crc

            async_save.copy_with_crc = copy_then_die
        if os.environ.get("DISTSFT_TEST_FAULT") == "slow_commit":
            import time

            commit = checkpoint.commit

            def slow(*args, **kwargs):
                time.sleep(float(os.environ.get("DISTSFT_TEST_FAULT_SLEEP", "6")))
                return commit(*args, **kwargs)

            checkpoint.commit = slow
    main()
