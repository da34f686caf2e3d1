"""The registered bank's model code (MLflow models-from-code): MLflow stores this file with the
model and runs it on `mlflow.pyfunc.load_model`, so no pickled object is stored or unpickled."""

from mlflow.models import set_model

from noiseclr.tracking.bank_model import BankModel

set_model(BankModel())
