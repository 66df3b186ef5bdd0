"""Pictures of what a model and a run do: patch-feature PCA maps, last-block CLS attention, and the
run report page.

* :mod:`ssl_path.viz.features`: patch tokens and per-head CLS attention of the last block;
* :mod:`ssl_path.viz.pca`: DINOv2 Fig. 1 style PCA of the patch tokens as RGB, background masked;
* :mod:`ssl_path.viz.regions`: slide regions (openslide) and tile folders to draw;
* :mod:`ssl_path.viz.draw`: regions -> PNGs (``ssl-path-viz``);
* :mod:`ssl_path.viz.metrics` and :mod:`ssl_path.viz.report`: a run directory -> static HTML page
  (``ssl-path-report``).
"""

from ssl_path.viz.draw import LoadedModel, RegionMaps, VizConfig, draw_regions, load_model, region_maps
from ssl_path.viz.features import PatchFeatures, cls_attention, encode
from ssl_path.viz.pca import PcaMap, foreground, pca_rgb
from ssl_path.viz.regions import Region, folder_tiles, regions_of, slide_region

__all__ = [
    "LoadedModel",
    "PatchFeatures",
    "PcaMap",
    "Region",
    "RegionMaps",
    "VizConfig",
    "cls_attention",
    "draw_regions",
    "encode",
    "folder_tiles",
    "foreground",
    "load_model",
    "pca_rgb",
    "region_maps",
    "regions_of",
    "slide_region",
]
