"""MLflow models-from-code entry of an edit state's pyfunc model (copied into each logged model).

MLflow runs this file when it loads the model, instead of unpickling an object: a model read from a
registry cannot run code beyond kedit's own (see :mod:`kedit.lineage.mlflow_model`).
"""

import mlflow.models

from kedit.lineage.mlflow_model import EditStateModel

mlflow.models.set_model(EditStateModel())
