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
Ours on bottle, EfficientNet-Lite2, 2-core CPU (image AUROC / pixel AUROC / AU-PRO; ms per image
and the other timings: docs/paper.md): 100 % 100.00 / 98.65 / 95.27; 10 % 100.00 / 98.67 / 95.07;
  1 % 100.00 / 98.51 / 94.95; 100 % + IVF-PQ nprobe 1: 100.00 / 98.62 / 95.17, recall@1 0.464;
  nprobe 8: 100.00 / 98.61 / 95.16, recall@1 0.487. The IVF-PQ index's k-means rounds differently
  on other CPUs (an AMD EPYC gave 95.18 / 0.462 / 0.485 with the same code).
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
