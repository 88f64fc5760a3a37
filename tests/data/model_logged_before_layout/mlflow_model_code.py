"""The code MLflow keeps inside a logged gpt2tune model ("models from code", see servable.py).

Loading the model runs this file, which hands MLflow the PythonModel, so no pickle is read.
"""

from mlflow.models import set_model

from gpt2tune.servable import GPT2Completer

set_model(GPT2Completer())
