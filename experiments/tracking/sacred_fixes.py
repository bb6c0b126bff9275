"""Every place pqa goes past Sacred 0.8.7's public API, each in one function here with the reason, so an
upgrade of Sacred is checked in one module:

- :func:`install`: Sacred's ``get_commit_if_possible`` reads ``repo.head.commit`` and raises
  ``ValueError: Reference at 'refs/heads/master' does not exist`` while *constructing the Experiment*
  in a repository without a commit. It is replaced by one built on :func:`git_info`, which returns
  None instead and redacts credentials in the remote URL (``https://user:token@host/...``).
- :func:`resolve_config`: pre-flight needs the config Sacred would run with (named configs, config
  scopes, overrides) without running or observing anything; Sacred has no public call for that
  (``print_config`` prints it), so ``Experiment._create_run`` unobserved.
- :func:`store_info_now`: a run's ``info.output_dir`` must be in the store before the first
  heartbeat (10 s in), so a run killed early can be resumed by its id: ``Run._emit_heartbeat``.
- :func:`add_config_scope`: a config scope that is an object (``ComponentDefaults``: it fills in the
  chosen components' defaults after the overrides are known), which ``Experiment.config`` (a
  decorator for functions whose body it parses) cannot take: ``Experiment.configurations``.
"""
from __future__ import annotations

import os
from pathlib import Path

from pqa_experiments.store.urls import redact_text


def git_info(path: str | os.PathLike) -> dict | None:
    """``{url, commit, dirty, root}`` of the git repository holding ``path``, else None.

    None for: no repository, a repository without any commit, no git, or any git error.
    ``url`` is the ``origin`` remote with credentials redacted (``git:/<root>`` without a
    remote), as Sacred records it.
    """
    try:
        from git import Repo

        p = Path(path)
        repo = Repo(p if p.is_dir() else p.parent, search_parent_directories=True)
    except Exception:
        return None
    try:
        if not repo.head.is_valid():
            return None  # `git init` but nothing committed yet
        commit = repo.head.commit.hexsha
        try:
            url = redact_text(repo.remote().url)
        except ValueError:
            url = "git:/" + str(repo.working_dir)
        return {"url": url, "commit": commit, "dirty": repo.is_dirty(), "root": str(repo.working_dir)}
    except Exception:
        return None
    finally:
        repo.close()


def safe_get_commit_if_possible(filename, save_git_info):
    """Drop-in for ``sacred.dependencies.get_commit_if_possible`` that cannot crash."""
    if save_git_info is False:
        return None, None, None
    info = git_info(os.path.dirname(os.path.abspath(filename)))
    if info is None:
        return None, None, None
    return info["url"], info["commit"], info["dirty"]


SACRED_GET_COMMIT = None  # Sacred's own version, kept for tests


def install() -> None:
    """Patch Sacred's git lookup (idempotent)."""
    global SACRED_GET_COMMIT
    import sacred.dependencies as deps

    if deps.get_commit_if_possible is not safe_get_commit_if_possible:
        SACRED_GET_COMMIT = deps.get_commit_if_possible
        deps.get_commit_if_possible = safe_get_commit_if_possible


def resolve_config(ex, updates, named_configs):
    """The run Sacred would make of ``updates`` and ``named_configs``, unobserved and not started: its
    ``config`` is the full resolved config (see the module docstring for why this is private API)."""
    return ex._create_run(config_updates=updates, named_configs=named_configs, options={"--unobserved": True})


def store_info_now(run) -> None:
    """Send the run's info to its observers now, not at the next heartbeat."""
    run._emit_heartbeat()


def add_config_scope(ex, scope) -> None:
    """Add a config scope object (called as Sacred calls the scopes ``ex.config`` makes)."""
    ex.configurations.append(scope)
