"""The CUDA-graph replay of the whole training step (--cuda-graph).
"""


import logging

import torch



logger = logging.getLogger("main")

# --- The CUDA-graph step ---------------------------------------------------------------------------


class CudaGraphTrainStep:
    """The whole training step (forward, loss, backward, optimizer) captured once as a CUDA graph.

    A ResNet18 step at batch 128 launches hundreds of small kernels; from Python that takes longer
    than the GPU needs to run them. Replaying a graph launches them all at once. This follows
    PyTorch's "whole-network capture" recipe (CUDA semantics notes): a few eager steps on a side
    stream first, static input buffers that every batch is copied into (shaped and typed like the
    data's), a capturable optimizer, and no host sync inside. The graph has a fixed batch size:
    the last, smaller batch of an epoch runs eagerly. If capture fails, it warns once and trains
    eagerly.
    """

    EAGER_STEPS_BEFORE_CAPTURE = 3  # Allocate cuDNN/cuBLAS workspaces and the optimizer state.

    def __init__(self, eager_step, optimizer, batch_size: int, inputs: torch.Tensor, targets: torch.Tensor):
        self.eager_step, self.optimizer, self.batch_size = eager_step, optimizer, batch_size
        self.inputs = inputs.new_zeros((batch_size, *inputs.shape[1:]))
        self.targets = targets.new_zeros((batch_size, *targets.shape[1:]))
        self.graph, self.loss, self.eager_steps, self.failed = None, None, 0, False

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(inputs) != self.batch_size or self.failed:
            return self.eager_step(inputs, targets)
        if self.graph is None and self.eager_steps < self.EAGER_STEPS_BEFORE_CAPTURE:
            self.eager_steps += 1
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                loss = self.eager_step(inputs, targets)
            torch.cuda.current_stream().wait_stream(side_stream)
            return loss
        if self.graph is None and not self.capture():
            return self.eager_step(inputs, targets)
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay()
        return self.loss  # Overwritten by the next replay: the caller adds it up at once.

    def capture(self) -> bool:
        try:
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # Gradients then live in the graph's memory pool.
            with torch.cuda.graph(graph):
                self.loss = self.eager_step(self.inputs, self.targets)
        except Exception as error:  # Capture refuses any host sync or CPU-GPU copy inside the step.
            logger.warning(f"Could not capture the training step in a CUDA graph ({type(error).__name__}: "
                           f"{error}); training without it")
            self.failed = True
            return False
        self.graph = graph
        return True


