"""Evaluation records: a metric that cannot be computed says why."""
import numpy as np

from patchcore_jax import evaluation


def test_metrics_that_cannot_be_computed_say_why():
  rng = np.random.default_rng(0)
  labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
  maps = rng.random((4, 8, 8))
  masks = np.zeros((4, 8, 8), bool)
  masks[2:, 2:4, 2:4] = True
  record = evaluation.metric_record(labels, scores, masks, maps)
  assert 'metric_notes' not in record and record['au_pro'] is not None
  # A crop that cut every defect off: both pixel metrics n/a, and the transform is named.
  record = evaluation.metric_record(labels, scores, np.zeros_like(masks), maps,
                                    transform='resize 256, centre crop 224')
  assert record['pixel_auroc'] is None and record['au_pro'] is None
  assert record['metric_notes']['pixel_auroc'] == (
      'no test mask has a defective pixel after the image transform (resize 256, centre crop '
      '224): pixel AUROC and AU-PRO need defective pixels (the defects lie outside the inspected '
      'region?)')
  assert set(record['metric_notes']) == {'pixel_auroc', 'au_pro'}
  record = evaluation.metric_record(np.zeros(4, int), scores)
  assert record['metric_notes'] == {
      'image_auroc': 'every test image is good: image AUROC needs both good and defective images',
      'pixel_auroc': 'the test data has no ground-truth masks',
      'au_pro': 'the test data has no ground-truth masks'}
  assert evaluation.describe_transform(
      {'resize': 256, 'image_size': 224, 'transform': 'resize_crop'}) == (
          'resize 256, centre crop 224')
  assert evaluation.describe_transform(
      {'resize': 256, 'image_size': 320, 'transform': 'resize'}) == 'resize to 320 x 320'
