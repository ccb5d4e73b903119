"""`make sweep`: recipes searched with Optuna (space), a study shared by workers (study, worker), and its report."""
