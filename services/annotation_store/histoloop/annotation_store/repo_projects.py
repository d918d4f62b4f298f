"""The repository's projects room: projects, class schema, loop config history, annotators.

Creating a project and growing its class schema, the ``UpdateProject`` config history,
annotators with their memberships and bearer tokens (only SHA-256 hashes are stored).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from histoloop.annotation_store import models as m
from histoloop.annotation_store.domain import (
    ClassSpec,
    ConfigChange,
    LoopSettings,
    ProjectInfo,
    check_id,
)
from histoloop.annotation_store.repo_base import ROLES, RepositoryBase, _now, _settings, _utc
from histoloop.auth import Identity, Role, hash_token
from histoloop.errors import AlreadyExists, InvalidArgument, NotFound

__all__ = ["ProjectsMixin"]

log = logging.getLogger(__name__)


class ProjectsMixin(RepositoryBase):
    """Projects, their classes and config history; annotators and their tokens."""

    def create_project(
        self, project_id: str, name: str, classes: Sequence[ClassSpec], config: LoopSettings
    ) -> ProjectInfo:
        """Create a project with its class schema and loop configuration.

        Raises:
            InvalidArgument: a bad id, class name, colour or config field.
            AlreadyExists: the project id is taken.
        """
        check_id(project_id, "project_id", project=True)
        name = (name or project_id).strip()
        if len(name) > 200:
            raise InvalidArgument("name: longer than 200 characters")
        specs = _validated_classes(classes, start=0, field_name="classes")
        config.validate()
        now = _now()
        try:
            with self.db.write() as s:
                if s.get(m.Project, project_id) is not None:
                    raise AlreadyExists(f"project {project_id!r} exists already")
                s.add(
                    m.Project(
                        id=project_id, name=name, created_at=now, label_version=0, **config.__dict__
                    )
                )
                s.flush()
                for pos, spec in enumerate(specs):
                    s.add(
                        m.ProjectClass(
                            project_id=project_id,
                            position=pos,
                            name=spec.name,
                            color=spec.color,
                            since_version=0,
                            created_at=now,
                        )
                    )
        except IntegrityError:
            raise AlreadyExists(f"project {project_id!r} exists already") from None
        log.info("created project %s with %d classes", project_id, len(specs))
        return self.get_project(project_id)

    def get_project(self, project_id: str) -> ProjectInfo:
        """A project, its classes and datasets. Raises :class:`NotFound`."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            classes = self._classes(s, project_id)
            datasets = s.scalars(
                select(m.Dataset.dataset_id)
                .where(m.Dataset.project_id == project_id)
                .order_by(m.Dataset.id)
            ).all()
            return ProjectInfo(
                project_id=project.id,
                name=project.name,
                classes=tuple(ClassSpec(c.name, c.color) for c in classes),
                config=_settings(project),
                created_at=_utc(project.created_at),
                datasets=tuple(datasets),
                label_version=project.label_version,
            )

    def list_projects(self, only: Iterable[str] | None = None) -> list[ProjectInfo]:
        """Every project (``only``: just these ids, e.g. an annotator's memberships), by id."""
        with self.db.read() as s:
            query = select(m.Project.id).order_by(m.Project.id)
            if only is not None:
                query = query.where(m.Project.id.in_(list(only)))
            ids = list(s.scalars(query))
        return [self.get_project(project_id) for project_id in ids]

    def add_classes(self, project_id: str, classes: Sequence[ClassSpec]) -> ProjectInfo:
        """Append classes to the schema; names already there (same colour) are kept as they are.

        Raises:
            NotFound: no such project.
            InvalidArgument: a bad name, or an existing name with another colour (classes
                are never changed or renamed).
        """
        if not classes:
            raise InvalidArgument("classes: nothing to add")
        with self.db.write() as s:
            project = self._project(s, project_id, lock=True)
            existing = {c.name: c for c in self._classes(s, project_id)}
            position = len(existing)
            seen: set[str] = set()
            for i, given in enumerate(classes):
                spec = given.validated(f"classes[{i}]", position)
                if spec.name in seen:
                    raise InvalidArgument(f"classes[{i}]: {spec.name!r} is given twice")
                seen.add(spec.name)
                held = existing.get(spec.name)
                if held is not None:
                    if given.color.strip() and given.color.strip().lower() != held.color:
                        raise InvalidArgument(
                            f"classes[{i}]: {spec.name!r} exists with colour {held.color}; "
                            "classes are never changed"
                        )
                    continue
                s.add(
                    m.ProjectClass(
                        project_id=project_id,
                        position=position,
                        name=spec.name,
                        color=spec.color,
                        since_version=project.label_version + 1,
                        created_at=_now(),
                    )
                )
                position += 1
        self._project_meta_cache.pop(project_id, None)
        return self.get_project(project_id)

    # config history: UpdateProject -------------------------------------------------------------
    def update_project(
        self, project_id: str, config: LoopSettings, *, changed_by: str, reason: str = ""
    ) -> ProjectInfo:
        """Replace a project's loop config; the next ``labels.committed`` carries it.

        The change is recorded (before, after, who, when, why, from which label version);
        an unchanged config records nothing.

        Raises:
            NotFound: no such project.
            InvalidArgument: a bad config field (named), or a reason over 2000 characters.
        """
        config.validate()
        if len(reason) > 2000:
            raise InvalidArgument("reason: longer than 2000 characters")
        with self.db.write() as s:
            project = self._project(s, project_id, lock=True)
            before = _settings(project)
            if before != config:
                for name, value in config.__dict__.items():
                    setattr(project, name, value)
                s.add(
                    m.ProjectConfigChange(
                        project_id=project_id,
                        changed_by=changed_by,
                        changed_at=_now(),
                        reason=reason,
                        before=dict(before.__dict__),
                        after=dict(config.__dict__),
                        from_label_version=project.label_version + 1,
                    )
                )
                log.info(
                    "project %s: loop config changed by %s: %s",
                    project_id,
                    changed_by,
                    {k: v for k, v in config.__dict__.items() if before.__dict__[k] != v},
                )
        self._project_meta_cache.pop(project_id, None)
        return self.get_project(project_id)

    def config_history(self, project_id: str) -> list[ConfigChange]:
        """Every UpdateProject change of a project, oldest first."""
        with self.db.read() as s:
            self._project(s, project_id)
            rows = s.scalars(
                select(m.ProjectConfigChange)
                .where(m.ProjectConfigChange.project_id == project_id)
                .order_by(m.ProjectConfigChange.id)
            ).all()
            return [
                ConfigChange(
                    before=_settings_from_json(r.before),
                    after=_settings_from_json(r.after),
                    changed_by=r.changed_by,
                    changed_at=_utc(r.changed_at),
                    reason=r.reason,
                    from_label_version=r.from_label_version,
                )
                for r in rows
            ]

    # annotators ------------------------------------------------------------------------------
    def register_annotator(
        self,
        annotator_id: str,
        *,
        display_name: str = "",
        role: Role | None = None,
        projects: Sequence[str] = (),
    ) -> str:
        """Create (or update) an annotator, add memberships, and issue a new token.

        The token is returned once; only its SHA-256 is stored. Registering an existing
        annotator again adds memberships, updates the name/role if given, and issues an
        additional token (earlier ones stay valid).

        Raises:
            InvalidArgument: a bad id or role.
            NotFound: a named project does not exist.
        """
        check_id(annotator_id, "annotator_id")
        if role is not None and role not in ROLES:
            raise InvalidArgument(f"role: {role!r} is not one of {', '.join(ROLES)}")
        # The prefix keeps a token from starting with "-", which a command line would read as a flag.
        token = "hl_" + secrets.token_urlsafe(32)
        now = _now()
        with self.db.write() as s:
            for i, project_id in enumerate(projects):
                if s.get(m.Project, project_id) is None:
                    raise NotFound(f"projects[{i}]: project {project_id!r} not found")
            annotator = s.get(m.Annotator, annotator_id)
            if annotator is None:
                s.add(
                    m.Annotator(
                        id=annotator_id,
                        display_name=display_name.strip() or annotator_id,
                        role=role or "annotator",
                        created_at=now,
                    )
                )
                s.flush()
            else:
                if display_name.strip():
                    annotator.display_name = display_name.strip()
                if role is not None:
                    annotator.role = role
            held = set(
                s.scalars(
                    select(m.Membership.project_id).where(m.Membership.annotator_id == annotator_id)
                )
            )
            for project_id in dict.fromkeys(projects):
                if project_id not in held:
                    s.add(m.Membership(annotator_id=annotator_id, project_id=project_id))
            s.add(
                m.AnnotatorToken(
                    token_hash=hash_token(token), annotator_id=annotator_id, created_at=now
                )
            )
        self._known_annotators.add(annotator_id)
        log.info("registered annotator %s (%d projects)", annotator_id, len(projects))
        return token

    def resolve_token(self, token: str) -> Identity | None:
        """The identity of an annotator token, or None if it is not one of ours."""
        with self.db.read() as s:
            row = s.execute(
                select(m.Annotator.id, m.Annotator.role)
                .join(m.AnnotatorToken, m.AnnotatorToken.annotator_id == m.Annotator.id)
                .where(m.AnnotatorToken.token_hash == hash_token(token))
            ).first()
            if row is None:
                return None
            annotator_id, role = row[0], cast(Role, row[1])  # the column holds only ROLES
            if role in ("admin", "service"):
                return Identity(subject=annotator_id, role=role, projects=None)
            projects = s.scalars(
                select(m.Membership.project_id).where(m.Membership.annotator_id == annotator_id)
            )
            return Identity(subject=annotator_id, role=role, projects=frozenset(projects))


def _validated_classes(
    classes: Sequence[ClassSpec], *, start: int, field_name: str
) -> list[ClassSpec]:
    specs: list[ClassSpec] = []
    seen: set[str] = set()
    for i, given in enumerate(classes):
        spec = given.validated(f"{field_name}[{i}]", start + i)
        if spec.name in seen:
            raise InvalidArgument(f"{field_name}[{i}]: {spec.name!r} is given twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _settings_from_json(values: Mapping[str, object]) -> LoopSettings:
    """Settings recorded in the history; fields added since take their defaults."""
    known = LoopSettings().__dict__
    return LoopSettings(**{**known, **{k: v for k, v in values.items() if k in known}})  # type: ignore[arg-type]
