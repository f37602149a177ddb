"""One pipeline stage in a process of its own, for tests that SIGKILL or SIGSTOP a stage.

    python -m tests.stagerunner MODEL_DIR INDEX EPOCH SECRET_HEX STAGES_JSON

STAGES_JSON lists every stage as [index, start, stop, host, port]; this process serves stage INDEX
on its port until killed. It prints "listening" once its listener is open.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import torch

from butterfly.engine.model import StageModel
from butterfly.engine.weights import open_model_dir
from butterfly.serving.stage import StageAddress, StageServer
from butterfly.weights.layout import LayerRange


async def main(model_dir: str, index: int, epoch: int, secret: bytes, stages: list[StageAddress]) -> None:
    torch.set_num_threads(1)
    me = stages[index]
    md = open_model_dir(Path(model_dir), LayerRange(me.start, me.stop))
    model = StageModel(md.config, md.weights, me.start, me.stop, md.layout.num_blocks)
    srv = StageServer(
        model,
        index=index,
        epoch=epoch,
        secret=secret,
        kv_cache_bytes=16 << 20,
        listen_port=me.port,
        node=f"n{index}",
    )
    await srv.listen()
    print("listening", flush=True)
    srv.start(stages)
    await asyncio.Event().wait()


if __name__ == "__main__":
    d, i, e, s, j = sys.argv[1:6]
    addrs = [StageAddress(a[0], a[1], a[2], a[3], a[4], f"n{a[0]}") for a in json.loads(j)]
    asyncio.run(main(d, int(i), int(e), bytes.fromhex(s), addrs))
