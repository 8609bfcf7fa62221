"""The MLflow registry and Optuna: registered models (logged as code), their cards and eval tags, gated promotion,
and the multi-objective sweep."""
