"""TFX wiring for tfrec_recall: ``create_pipeline`` (pipeline.py), custom components (components.py), the
protocol split as a Beam transform (transforms.py), runners (runners.py) and the ``tfrec-recall pipeline`` CLI
(cli.py). This package imports the library; the library never imports it or tfx."""

import tfrec_recall  # noqa: F401  (first: selects tf-keras before tfx imports TensorFlow)
