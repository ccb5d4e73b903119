"""What leaves for Kaggle's notebooks: a wheel dataset and a notebook that run a recipe there offline (make kaggle),
their push and the fetch of what the notebook wrote (make kaggle-push, make kaggle-output)."""
