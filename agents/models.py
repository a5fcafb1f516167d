"""Agents, their skills, sessions with their messages, runs and knowledge documents."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

NAME_RE = r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$"
name_validator = RegexValidator(
    NAME_RE, "Use 1-64 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit."
)
MODEL_RE = r"^[a-z0-9][a-z0-9_-]*/\S+$"
model_validator = RegexValidator(MODEL_RE, 'Write the model as "provider/model-name", e.g. "openai/gpt-4o-mini".')


class Skill(models.Model):
    class Kind(models.TextChoices):
        BUILTIN = "builtin", "Built-in"
        HTTP = "http", "HTTP endpoint"

    name = models.CharField(max_length=64, unique=True, validators=[name_validator])
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.BUILTIN)
    # JSON schema of the arguments, offered to the model as the tool's `parameters`.
    parameters = models.JSONField(default=dict, blank=True)
    # builtin: options of the implementation (e.g. http_fetch's allowed_hosts);
    # http: {"url": ..., "timeout_seconds": ..., "headers": {...}}.
    config = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Agent(models.Model):
    name = models.CharField(max_length=64, unique=True, validators=[name_validator],
                            help_text="Used in URLs and as the `model` of the OpenAI-compatible endpoint.")
    description = models.TextField(blank=True)
    model = models.CharField(max_length=200, validators=[model_validator],
                             help_text='"provider/model-name"; `local/...` is the built-in offline model.')
    system_prompt = models.TextField(blank=True)
    temperature = models.FloatField(default=0.7, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)])
    max_tokens = models.PositiveIntegerField(default=1024, validators=[MinValueValidator(1), MaxValueValidator(200_000)])
    # Tried in order when the primary model fails with a retryable error before answering.
    fallback_models = models.JSONField(default=list, blank=True)
    # The whole run's deadline: every call, retry, fallback and tool step (agents.resilience).
    timeout_seconds = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1), MaxValueValidator(3600)])
    max_retries = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(10)],
        help_text="Retries of a failed model call on the same model (transient failures only); "
                  "empty: the LLM_MAX_RETRIES setting.")
    enabled = models.BooleanField(default=True)
    # Governance per agent: an optional requests/min limit across all keys, masking of stored
    # transcripts, and what to do with a message the prompt-injection heuristic flags.
    rate_limit_rpm = models.PositiveIntegerField(null=True, blank=True)
    mask_transcripts = models.BooleanField(default=False, help_text="Mask PII in stored messages.")
    block_prompt_injection = models.BooleanField(
        default=False, help_text="Refuse (400) messages flagged as prompt injection; otherwise only audit them.")
    skills = models.ManyToManyField(Skill, through="AgentSkill", blank=True, related_name="agents")
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if not isinstance(self.fallback_models, list) or not all(isinstance(m, str) for m in self.fallback_models):
            raise ValidationError({"fallback_models": "A list of model strings."})
        for fallback in self.fallback_models:
            try:
                model_validator(fallback)
            except ValidationError as exc:
                raise ValidationError({"fallback_models": f"{fallback!r}: {exc.messages[0]}"}) from exc
        if not isinstance(self.metadata, dict):
            raise ValidationError({"metadata": "A JSON object."})


class AgentSkill(models.Model):
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="agent_skills")
    skill = models.ForeignKey(Skill, on_delete=models.CASCADE, related_name="skill_agents")
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["position", "id"]
        constraints = [models.UniqueConstraint(fields=["agent", "skill"], name="agentskill_unique")]
        verbose_name = "skill"

    def __str__(self) -> str:
        return f"{self.agent_id}:{self.skill_id}"


class Session(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="sessions")
    api_key = models.ForeignKey("governance.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="sessions", help_text="The key that owns the session.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="agent_sessions", help_text="The staff user that owns the session.")
    title = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_activity_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-last_activity_at"]
        indexes = [models.Index(fields=["api_key", "-last_activity_at"], name="session_key_activity")]

    def __str__(self) -> str:
        return str(self.id)


class CallbackStatus(models.TextChoices):
    NONE = "", "none"
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Run(models.Model):
    CallbackStatus = CallbackStatus

    class Status(models.TextChoices):
        QUEUED = "queued"  # an async run waiting for a Celery worker
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        # Its worker died (the lease ran out): ended by agents.recovery's sweeper, its budget
        # reservation settled to an estimate of what was produced.
        INTERRUPTED = "interrupted"

    FINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.INTERRUPTED)

    class Transport(models.TextChoices):
        REST = "rest"
        SSE = "sse"
        OPENAI = "openai"
        WEBSOCKET = "websocket"
        TASK = "task"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="runs")
    session = models.ForeignKey(Session, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    api_key = models.ForeignKey("governance.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True)
    transport = models.CharField(max_length=16, choices=Transport.choices)
    model = models.CharField(max_length=200, blank=True, help_text="The model that answered (after any fallback).")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    steps = models.PositiveSmallIntegerField(default=0, help_text="Model calls made (tool loop steps and fallbacks).")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    metadata = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # A person's rating of the answer (chat console thumbs): 1 up, -1 down; feeds experiments.
    feedback = models.SmallIntegerField(null=True, blank=True, choices=[(1, "up"), (-1, "down")])
    feedback_at = models.DateTimeField(null=True, blank=True)
    feedback_comment = models.TextField(blank=True)
    # The experiment variant that served the run ("" when none applied), and its experiment's
    # id (experiments.Experiment; a plain column: agents does not import the experiments app).
    variant = models.CharField(max_length=100, blank=True)
    experiment_id = models.PositiveIntegerField(null=True, blank=True, db_index=True)
    # Crash safety (agents.recovery): a running run's worker renews this lease; a run whose
    # lease ran out is ended as interrupted. `reservation` is its open budget reservation
    # ({"spend_ids": [...], "amount": "..."}), settled by whoever ends the run.
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    reservation = models.JSONField(default=dict, blank=True)
    # Async runs (POST /api/v1/agents/{name}/runs): the request to execute, the answer, where
    # to report completion, and whether the caller asked to cancel.
    input = models.JSONField(default=dict, blank=True)
    output = models.TextField(blank=True)
    callback_url = models.URLField(max_length=2000, blank=True)
    cancel_requested = models.BooleanField(default=False)
    # agents.runs: when the run was queued (async runs only), last handed to the broker (the scan
    # of lost enqueues), and how many times a worker started it (a dead worker's run runs again).
    queued_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Times a worker started this async run.")
    callback_status = models.CharField(max_length=16, choices=CallbackStatus.choices, blank=True)
    callback_attempts = models.PositiveSmallIntegerField(default=0)
    callback_error = models.TextField(blank=True)
    callback_delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["agent", "-started_at"], name="run_agent_started"),
                   models.Index(fields=["api_key", "-started_at"], name="run_key_started"),
                   # The sweeper's scan: running runs by lease.
                   models.Index(fields=["status", "lease_expires_at"], name="run_status_lease"),
                   # The scan of callbacks never tried: the few pending ones, not every run.
                   models.Index(fields=["finished_at"], name="run_callback_pending",
                                condition=models.Q(callback_status="pending"))]

    def __str__(self) -> str:
        return str(self.id)


class DeadLetter(models.Model):
    """Async work that failed for good (agents.runs): a run that ended failed or interrupted, or a
    callback out of retries; with its context, masked. The admin's retry action runs it again."""

    class Task(models.TextChoices):
        RUN = "agents.tasks.execute_run_task", "run"
        CALLBACK = "agents.tasks.deliver_run_callback_task", "callback"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="dead_letters")
    task = models.CharField(max_length=100, choices=Task.choices)
    # What the task had to work with (the request, the key, the agent), masked like the audit log.
    context = models.JSONField(default=dict, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    retried_at = models.DateTimeField(null=True, blank=True)
    retried_by = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_task_display()} {self.run_id}: {self.error_code}"


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="messages")
    run = models.ForeignKey(Run, null=True, blank=True, on_delete=models.SET_NULL, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # assistant: [{"id", "name", "arguments"}]; tool: the id it answers and the skill's name.
    tool_calls = models.JSONField(default=list, blank=True)
    tool_call_id = models.CharField(max_length=128, blank=True)
    name = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["session", "created_at", "id"], name="message_session_order")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class Document(models.Model):
    """Knowledge an agent's knowledge_search skill searches (full-text on PostgreSQL)."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=200)
    content = models.TextField()
    source = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["agent", "title"]

    def __str__(self) -> str:
        return self.title
