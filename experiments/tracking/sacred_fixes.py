"""A fix to Sacred 0.8.7 that every experiment needs: a git lookup that cannot crash.

Sacred's ``get_commit_if_possible`` reads ``repo.head.commit`` and raises ``ValueError:
Reference at 'refs/heads/master' does not exist`` while *constructing the Experiment* in a
repository without a commit. :func:`install` replaces it with one built on :func:`git_info`,
which returns None instead and redacts credentials in the remote URL
(``https://user:token@host/...``). ``make_experiment`` calls :func:`install`.
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
