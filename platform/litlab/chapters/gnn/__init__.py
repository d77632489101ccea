"""Chapter 10, graph neural networks: GCN, GraphSAGE and GAT layers from the equations (layers.py),
node classifiers (`gcn`, `graphsage`, `gat`), the over-smoothing depth sweep (`gnn_depth_sweep`) and
graph classification with a readout (`graph_classifier`); importing registers them."""

from litlab.chapters.gnn import graph_classification, module, oversmoothing  # noqa: F401
