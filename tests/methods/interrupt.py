"""Interrupting a multi-stage run (`stages.run`) at a chosen point, as a crash would."""

import numpy as np
import pytest

from jaxda.data import input_pipeline
from jaxda.train import offline, stages


class Crash(Exception):
    pass


def in_offline_pass(monkeypatch, config, workdir: str, pass_name: str, batches: int = 1):
    """Runs `config` until pass `pass_name` has written `batches` chunks, then crashes."""
    save, calls = np.savez, []

    def crashing_savez(path, *args, **kwargs):
        if pass_name in str(path):
            calls.append(1)
            if len(calls) > batches:
                raise Crash
        return save(path, *args, **kwargs)

    monkeypatch.setattr(offline.np, "savez", crashing_savez)
    with pytest.raises(Crash):
        stages.run(config, workdir)
    monkeypatch.setattr(offline.np, "savez", save)


def in_training(monkeypatch, config, workdir: str, select, steps: int = 2):
    """Runs `config` until the training stream(s) for which `select(stream config)` is true
    have yielded the batches of `steps` steps, then crashes before the next step."""
    make_iterator = input_pipeline.train_iterator

    def crashing_iterator(reader, domain_config, *args, **kwargs):
        iterator = make_iterator(reader, domain_config, *args, **kwargs)
        if select(domain_config):
            # One batch more than the steps: the loop prefetches the next batch.
            for _ in range(steps + 1):
                yield next(iterator)
            raise Crash
        yield from iterator

    monkeypatch.setattr(input_pipeline, "train_iterator", crashing_iterator)
    with pytest.raises(Crash):
        stages.run(config, workdir)
    monkeypatch.setattr(input_pipeline, "train_iterator", make_iterator)
