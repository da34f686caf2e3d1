"""The pyfunc form of a bank (its own module: importing mlflow is slow, and only logging and
`mlflow.pyfunc.load_model` need it)."""

from __future__ import annotations

import mlflow.pyfunc

from noiseclr.bank import DirectionBank


class BankModel(mlflow.pyfunc.PythonModel):
    """predict(["3", "<shapes-1>", "-:hue->cyan, +:lightness-"]) -> one direction vector per key."""

    def load_context(self, context) -> None:
        self.bank = DirectionBank.load(context.artifacts["bank"])

    def predict(self, context, model_input, params=None):
        keys = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return [self.bank.directions[self.bank.index(str(k))].tolist() for k in keys]
