"""One side (JAX or PyTorch) of benchmarks/vs_pytorch.py, in its own process, run on command.

  python benchmarks/vs_pytorch_worker.py {jax,torch} SPEC_JSON

The worker builds its model from the shared weights, runs the case once (JAX: compiles it
first, timed apart) and saves that first output for the agreement check, answers '@@ready',
then waits on stdin for JSON commands: {"cmd": "run", "iters": n} times n more runs,
{"cmd": "stats"} returns memory, {"cmd": "exit"} ends it. Replies are single stdout lines
'@@' + JSON; anything else a library prints goes to stderr. Commands arrive one at a time,
so the driver can alternate two workers without them ever competing for the cores.
"""

import json
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

AUX_WEIGHT, BASE_LR, MOMENTUM, WEIGHT_DECAY, POWER, HEAD_LR_MULT, MAX_ITER = (
  0.4, 0.01, 0.9, 1e-4, 0.9, 10.0, 1000
)  # fmt: skip
HEAD_MODULES = ('ppm', 'cls', 'aux')


def reply(**message: Any) -> None:
  print('@@' + json.dumps(message), file=sys.__stdout__, flush=True)


def rss_peak_bytes() -> int:
  """Peak resident set of this process since start or since reset_rss_peak (Linux VmHWM)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource  # noqa: PLC0415

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_peak() -> bool:
  """Resets VmHWM to the current resident set (Linux >= 4.0); False where impossible."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def load_inputs(spec: dict) -> dict[str, np.ndarray]:
  with np.load(spec['inputs']) as data:
    return {k: data[k] for k in data.files}


def poly_lr(step: int) -> float:
  """tool/train.py's poly_learning_rate at optimiser step `step` (0-based)."""
  return BASE_LR * (1.0 - step / MAX_ITER) ** POWER


class TorchSide:
  """TorchPSPNet (NCHW, as the original) on CUDA if available, else the CPU."""

  def __init__(self, spec: dict):
    import torch  # noqa: PLC0415

    from psp_jax.interop.torch_pspnet import TorchPSPNet  # noqa: PLC0415

    self.torch, self.spec = torch, spec
    torch.set_num_threads(spec['threads'])
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = TorchPSPNet(**spec['model'])
    model.load_state_dict(torch.load(spec['torch_weights'], weights_only=True))
    self.model = model.to(self.device)
    inputs = load_inputs(spec)
    self.images = torch.from_numpy(inputs['images']).permute(0, 3, 1, 2).contiguous()
    self.images = self.images.to(self.device)
    self.labels = torch.from_numpy(inputs['labels']).long().to(self.device)
    self.step_count = 0
    if spec['kind'] == 'train':
      for m in model.modules():
        if isinstance(m, torch.nn.Dropout2d):
          m.p = 0.0  # masks cannot agree across frameworks (JAX side: dropout_rate 0)
      head = [p for n, p in model.named_parameters() if n.split('.')[0] in HEAD_MODULES]
      body = [p for n, p in model.named_parameters() if n.split('.')[0] not in HEAD_MODULES]
      self.optimizer = torch.optim.SGD(
        [{'params': body, 'lr': BASE_LR}, {'params': head, 'lr': BASE_LR * HEAD_LR_MULT}],
        lr=BASE_LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
      )
      self.criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
      model.train()
    else:
      model.eval()

  def sync(self) -> None:
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def run_once(self) -> Any:
    torch = self.torch
    if self.spec['kind'] == 'eval':
      with torch.inference_mode():
        return self.model(self.images)
    lr = poly_lr(self.step_count)
    self.optimizer.param_groups[0]['lr'] = lr
    self.optimizer.param_groups[1]['lr'] = lr * HEAD_LR_MULT
    self.optimizer.zero_grad(set_to_none=True)
    main, aux = self.model(self.images)
    loss = self.criterion(main, self.labels) + AUX_WEIGHT * self.criterion(aux, self.labels)
    loss.backward()
    self.optimizer.step()
    self.step_count += 1
    return loss

  def first_run(self, out_path: str) -> dict:
    """Runs once and saves what the agreement check compares; returns setup facts."""
    torch = self.torch
    before = {k: v.detach().cpu().numpy().copy() for k, v in self.model.named_parameters()}
    start = time.perf_counter()
    out = self.run_once()
    self.sync()
    first = time.perf_counter() - start
    if self.spec['kind'] == 'eval':
      np.savez(out_path, logits=out.permute(0, 2, 3, 1).cpu().numpy())
    else:
      deltas = {k: p.detach().cpu().numpy() - before[k] for k, p in self.model.named_parameters()}
      np.savez(out_path, loss=np.float64(out.item()), **deltas)
    return dict(
      first_run_s=first,
      platform=self.device.type,
      device=torch.cuda.get_device_name() if self.device.type == 'cuda' else 'cpu',
      threads=torch.get_num_threads(),
    )

  def memory(self) -> dict:
    if self.device.type == 'cuda':
      return dict(device_peak_bytes=int(self.torch.cuda.max_memory_allocated()))
    return {}

  def reset_memory(self) -> None:
    if self.device.type == 'cuda':
      self.torch.cuda.reset_peak_memory_stats()


class JaxSide:
  """The Flax PSPNet and the project's real jitted train step, on JAX's default device."""

  def __init__(self, spec: dict):
    from psp_jax import distributed  # noqa: PLC0415 (the JAX side only, after XLA_FLAGS)

    if spec.get('xla_flags') is not None:
      os.environ['XLA_FLAGS'] = spec['xla_flags']
    else:
      distributed.set_cpu_xla_flags()
    import jax  # noqa: PLC0415 (the JAX side only, after XLA_FLAGS)
    import jax.numpy as jnp  # noqa: PLC0415 (the JAX side only, after XLA_FLAGS)
    from flax import traverse_util  # noqa: PLC0415 (the JAX side only, after XLA_FLAGS)

    from psp_jax.models import codec  # noqa: PLC0415 (the JAX side only, after XLA_FLAGS)
    from psp_jax.train import optim, train_state, train_step  # noqa: PLC0415 (the JAX side only, after XLA_FLAGS)

    self.jax, self.spec = jax, spec
    self.device = jax.devices()[0]
    dtype = jnp.dtype(spec['dtype'])
    dropout = 0.0 if spec['kind'] == 'train' else 0.1
    self.model = codec.build_model({**spec['model'], 'dropout_rate': dropout, 'dtype': dtype})
    inputs = load_inputs(spec)
    images = jax.device_put(inputs['images'], self.device)
    if spec.get('flax_weights'):
      with np.load(spec['flax_weights']) as data:
        flat = {tuple(k.split('/')): data[k] for k in data.files}
      variables = traverse_util.unflatten_dict(flat)
    else:  # no PyTorch here (e.g. a TPU VM): the model's own initialisation
      variables = self.model.init(jax.random.key(0), images[:1], train=False)
      variables = jax.tree.map(np.asarray, dict(variables))
    self.mesh = distributed.create_mesh([self.device])
    if spec['kind'] == 'eval':
      model = self.model

      def forward(variables, images):
        return model.apply(variables, images, train=False)

      self.fn, self.args = jax.jit(forward), [jax.device_put(variables, self.device), images]
      self.donated = False
    else:
      config = SimpleNamespace(
        base_lr=BASE_LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        power=POWER,
        head_lr_mult=HEAD_LR_MULT,
        warmup_steps=0,
        min_lr=0.0,
      )
      tx, schedule = optim.create_optimizer(config, MAX_ITER)
      step = train_step.make_train_step(self.model, tx, schedule, aux_weight=AUX_WEIGHT)
      params = variables['params']
      state = train_state.TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=variables['batch_stats'],
        opt_state=tx.init(params),
      )
      shardings = train_state.state_shardings(state, self.mesh)
      state = jax.device_put(state, shardings)
      batch = {'image': images, 'label': jax.device_put(inputs['labels'], self.device)}
      self.fn = train_step.compile_train_step(step, shardings, self.mesh)
      self.args = [state, batch, jax.random.key(0)]
      self.donated = True
    self.initial = variables

  def run_once(self) -> Any:
    out = self.compiled(*self.args)
    if self.donated:  # the old state was donated: carry the new one
      self.args[0], out = out
    return self.jax.block_until_ready(out)

  def first_run(self, out_path: str) -> dict:
    import jax  # noqa: PLC0415
    from flops import function_flops, xla_flops  # noqa: PLC0415

    from psp_jax.interop import semseg  # noqa: PLC0415

    start = time.perf_counter()
    lowered = self.fn.lower(*self.args)
    self.compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    analytic = function_flops(self.fn, *self.args)
    start = time.perf_counter()
    out = self.run_once()
    first = time.perf_counter() - start
    if self.spec['kind'] == 'eval':
      np.savez(out_path, logits=np.asarray(out))
    else:
      before = semseg.to_torch_names({'params': self.initial['params']})
      after = semseg.to_torch_names({'params': jax.device_get(self.args[0].params)})
      deltas = {k: after[k] - before[k] for k in before}
      np.savez(out_path, loss=np.float64(out['loss']), **deltas)
    self.initial = None
    return dict(
      compile_s=compile_s,
      first_run_s=first,
      platform=self.device.platform,
      device=getattr(self.device, 'device_kind', str(self.device)),
      flops_analytic=analytic['total'],
      flops_xla=xla_flops(self.compiled),
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      threads=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
    )

  def memory(self) -> dict:
    stats = self.device.memory_stats() if self.device.platform != 'cpu' else None
    if stats and 'peak_bytes_in_use' in stats:
      return dict(device_peak_bytes=int(stats['peak_bytes_in_use']))
    return {}

  def reset_memory(self) -> None:
    pass  # JAX has no reset of the device peak; the lifetime peak is reported


def main() -> None:
  framework, spec = sys.argv[1], json.loads(sys.argv[2])
  sys.stdout = sys.stderr  # stdout carries the protocol only
  if spec.get('cores') and hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, spec['cores'])
  side = (TorchSide if framework == 'torch' else JaxSide)(spec)
  facts = side.first_run(spec['out_prefix'] + f'_{framework}.npz')
  setup_peak = rss_peak_bytes()
  steady_reset = reset_rss_peak()
  side.reset_memory()
  reply(event='ready', setup_rss_peak_bytes=setup_peak, **facts)
  for line in sys.stdin:
    command = json.loads(line)
    if command['cmd'] == 'run':
      times = []
      for _ in range(int(command.get('iters', 1))):
        start = time.perf_counter()
        side.run_once()
        if framework == 'torch':
          side.sync()
        times.append(time.perf_counter() - start)
      reply(event='run', seconds=times)
    elif command['cmd'] == 'stats':
      run_peak = rss_peak_bytes() if steady_reset else None
      reply(event='stats', run_rss_peak_bytes=run_peak, rss_peak_bytes=max(setup_peak,
            rss_peak_bytes()), **side.memory())  # fmt: skip
    elif command['cmd'] == 'exit':
      break


if __name__ == '__main__':
  main()
