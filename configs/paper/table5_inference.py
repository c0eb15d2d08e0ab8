r"""Table 5: inference time per image for PatchCore-100 %, 10 %, 1 % and 100 % with IVF-PQ.

  python launch.py --config=configs/paper/table5_inference.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/table5

One process: features once, the greedy coreset once to 10 % (its prefix is the 1 % coreset);
every bank searched exactly (the screened exact kNN), and the whole bank also through an IVF-PQ
index in JAX (patchcore_jax.ivfpq; the official code's faiss parameters: 512 lists, 64 x 8-bit
codes; nprobe 1, faiss's default, and 8). Per variant: ms per image (the compiled test-time
embedding plus the search, maps included), recall@1 of IVF-PQ against the exact search, the
metrics. Add --config.sweep.ivfpq.percentages="()" to index every bank.

Arguments: category, backbone.
Paper: PatchCore-10 % takes 0.22 s per image (its GPU); 100 % + IVFPQ loses about one point of
  image AUROC and is still slower than PatchCore-1 %.
Ours on bottle, EfficientNet-Lite2, 2-core CPU (ms per image; image AUROC / pixel AUROC / AU-PRO):
  100 % 1574 ms, 100.00 / 98.65 / 95.27; 10 % 100 ms, 100.00 / 98.67 / 95.07; 1 % 42 ms, 100.00 /
  98.51 / 94.95; 100 % + IVF-PQ nprobe 1: 98 ms, 100.00 / 98.62 / 95.18, recall@1 0.462; nprobe 8:
  831 ms, recall@1 0.485 (index built in 35 s); 5 min 12 s in all (docs/paper.md).
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2')
  config = sweep_base(args, percentages=(1.0, 0.1, 0.01), paper='table5')
  config.sweep.searches = ('exact', 'ivfpq')
  config.sweep.ivfpq.nprobe = (1, 8)
  config.sweep.ivfpq.percentages = (1.0,)
  config.lock()
  return config
