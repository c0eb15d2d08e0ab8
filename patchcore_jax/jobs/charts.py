"""The jobs' PNG charts, drawn with PIL alone: a canvas with a title, framed axes, series drawn
as lines with point markers, and a legend."""
from PIL import Image
from PIL import ImageDraw

COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2',
           '#7f7f7f', '#bcbd22', '#17becf']


def canvas(size, title=None, *, title_at=(60, 8)):
  """(image, draw): a white RGB canvas of `size` (width, height), `title` at `title_at`."""
  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  if title:
    draw.text(title_at, title, fill='black')
  return image, draw


def frame(draw, left, top, right, bottom):
  """The axes' box."""
  draw.rectangle([left, top, right, bottom], outline='black')


def series(draw, xy, colour, *, markers=True):
  """A line through the points `xy` [(x, y), ...] (pixels), with a dot at each point."""
  if len(xy) > 1:
    draw.line(xy, fill=colour, width=2)
  if markers:
    for x, y in xy:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def legend(draw, x, y, entries, *, step=16):
  """(label, colour) entries, one a line, from (x, y) down."""
  for j, (label, colour) in enumerate(entries):
    draw.text((x, y + step * j), label, fill=colour)
