"""``accelerate launch -m tests.integration.fault_entry key=value ...``: distsft.train with a real fault injected
on one rank, for the failure tests (a monkeypatch cannot reach launched processes).

    DISTSFT_TEST_FAULT=save_oserror   the main process's flush of a checkpoint raises ENOSPC (rank 0), as a full disk
                                      would while it finishes a checkpoint and the other ranks wait for it
    DISTSFT_TEST_FAULT=uneven_samples this rank's sample replies run to logging.sample_max_new_tokens (no early eos):
                                      the ranks' greedy replies end at different lengths
"""

from __future__ import annotations

import errno
import os

if __name__ == "__main__":
    import distsft.trainer.checkpoint as checkpoint
    from distsft.train import main

    if os.environ.get("RANK") == os.environ.get("DISTSFT_TEST_FAULT_RANK", "0"):
        if os.environ.get("DISTSFT_TEST_FAULT") == "save_oserror":
            def full_disk(directory, *args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

            checkpoint._fsync_tree = full_disk
        if os.environ.get("DISTSFT_TEST_FAULT") == "uneven_samples":
            import distsft.trainer.samples as samples

            reply = samples.greedy_reply

            def longer(model, tokenizer, prompt, max_new_tokens, device=None, **kwargs):
                return reply(model, tokenizer, prompt, max_new_tokens, device, min_new_tokens=max_new_tokens, **kwargs)

            samples.greedy_reply = longer
    main()
