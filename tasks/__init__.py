"""Pipeline steps. Each module exposes plain functions over paths and params (no Prefect, no DVC imports);
`tasks.cli` runs them for `dvc.yaml`, and `flows/` wraps them as Prefect tasks."""
