"""`rlhf train`, `rlhf jobs ...` and `rlhf reward-models ...`: training jobs of both services, and their results."""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from rlhf.sdk.cli import output
from rlhf.sdk.cli.common import add_parser, client_parser, read_config, subcommands
from rlhf.sdk.cli.errors import INTERRUPTED, CliError, connected, interrupt_says, service_error
from rlhf.sdk.cli.progress import state_name, watch_policy_job, watch_reward_job

ALGORITHMS = ("grpo", "ppo", "rloo")  # rlhf.sdk.clients.algorithm_number gives their contract numbers
FAILED = 1  # exit code of a job that ended without success

CONFIG_EXAMPLE = """\
example --config file (a TrainingConfig: any of its fields, proto names; unset fields keep their defaults):
  {"use_lora": true, "learning_rate": 3e-4, "batch_size": 16, "mini_batch_size": 8, "max_new_tokens": 32}"""


# --- train -----------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from rlhf.policy.v1 import policy_service_pb2 as pol
    from rlhf.sdk.clients import PolicyClient, algorithm_number

    request = pol.TrainPolicyRequest(
        agent_id=args.agent_id,
        dry_run=args.dry_run,
        algorithm=algorithm_number(args.algorithm),
        reward_model_version=args.reward_model_version or "",
    )
    if args.max_steps is not None:
        request.max_steps = args.max_steps
    if args.learning_rate is not None:
        request.learning_rate = args.learning_rate
    if args.config:
        read_config(args.config, request.config)
    if args.reward_config:
        read_config(args.reward_config, request.reward_model_config)
    with connected(PolicyClient(args.policy_addr)) as client:
        response = client.train(request)
        if args.dry_run:
            _show_estimate(response, args.agent_id, args.json)
            return 0
        job = response.job
        return _follow_policy_job(client, job, args, f"job {job.job_id} started ({args.algorithm.upper()})")


def _follow_policy_job(client: Any, job: Any, args: argparse.Namespace, what: str) -> int:
    """A policy job just queued: its id (--no-watch), or its progress until it ends and then its outcome."""
    from rlhf.sdk.clients import RewardClient

    if getattr(args, "no_watch", False):
        _queued(job, args.json)
        return 0

    def follow() -> Any:
        with RewardClient(args.reward_addr) as reward:
            return watch_policy_job(client, job.job_id, reward)

    return _policy_outcome(client, _watch(follow, job.job_id, what), args.json)


def _watch(follow: Any, job_id: str, what: str) -> Any:
    """`follow()` (a job's progress until it ends), announced as `what`; Ctrl-C from the announcement on
    stops the watching only, and says so."""
    stopped = f"stopped watching; job {job_id} goes on (rlhf jobs watch {job_id}; rlhf jobs cancel {job_id})"
    try:
        with interrupt_says(stopped):
            output.note(f"{what}; Ctrl-C stops watching, not the job")
            return follow()
    except KeyboardInterrupt:  # main() not in the main thread: no exit_on_interrupt
        raise CliError(stopped, INTERRUPTED) from None


def _queued(job: Any, as_json: bool) -> None:
    if as_json:
        output.print_json(job)
    else:
        output.stdout().print(f"job {job.job_id} queued for {job.agent_id}", markup=False)
        output.note(f"follow it with: rlhf jobs watch {job.job_id}")


def _show_estimate(response: Any, agent_id: str, as_json: bool) -> None:
    if as_json:
        output.print_json(response)
        return
    lines = [
        f"dry run for {agent_id}: "
        f"{response.estimated_steps} steps on {response.feedback_count} feedback items "
        f"(scores mean {response.score_mean:.3f}, std {response.score_std:.3f})",
        f"estimated time  {response.estimated_time_minutes:.1f} min: reward model "
        f"{response.estimated_reward_model_minutes:.1f}, loading {response.estimated_loading_minutes:.1f}, "
        f"training {response.estimated_training_minutes:.1f}, saving {response.estimated_saving_minutes:.1f}",
        f"peak memory     {_bytes(response.estimated_peak_memory_bytes)}",
        f"basis           {response.estimate_basis}",
    ]
    console = output.stdout()
    for line in lines:
        console.print(line, markup=False)


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _duration(job: Any) -> str:
    if not (job.HasField("started_at") and job.HasField("finished_at")):
        return ""
    seconds = job.finished_at.ToSeconds() - job.started_at.ToSeconds()
    return f", {seconds // 60:.0f} min {seconds % 60:.0f} s" if seconds >= 60 else f", {seconds:.0f} s"


def _failure(job: Any, kind: str) -> CliError:
    """A job that ended without success: its reason first, on one line, then what to do."""
    state = state_name(job)
    reason = " ".join(job.error.split()) or "no reason recorded"
    hint = ""
    if kind == "policy" and state in ("FAILED", "CANCELLED", "INTERRUPTED"):
        hint = f" (resume from its last checkpoint: rlhf jobs resume {job.job_id})"
    return CliError(f"{kind} job {job.job_id} {state}: {reason}{hint}", FAILED)


def _outcome(job: Any, kind: str, as_json: bool, key: str, fetch: Any, summary: Any) -> int:
    """How a watched job ended: its result (`fetch()`, under `key` in --json) summarised in lines, or its
    failure raised with the reason first."""
    if state_name(job) != "SUCCEEDED":
        if as_json:
            output.print_json({"job": job})
        raise _failure(job, kind)
    result = fetch()
    if as_json:
        output.print_json({"job": job, key: result})
        return 0
    console = output.stdout()
    for line in summary(result):
        console.print(line, markup=False)
    return 0


def _policy_outcome(client: Any, job: Any, as_json: bool) -> int:
    def summary(policy: Any) -> list[str]:
        m = policy.metrics
        return [
            f"trained {policy.agent_id} {policy.version} (job {job.job_id}: {m.training_steps} steps{_duration(job)})",
            f"  reward (0..1 feedback scale)  {m.initial_reward_mean:.3f} -> {m.reward_mean:.3f} "
            f"(std {m.reward_std:.3f})",
            f"  KL to the base model          {m.kl:.3f}",
            f"  reward model                  {policy.reward_model_version}",
            f"  policy model                  {policy.model_path}",
            f"  curves                        {policy.artifact_path}/curves.png",
            f"  serve it                      rlhf deploy {policy.agent_id} {policy.version}=1",
        ]

    return _outcome(
        job, "policy", as_json, "policy", lambda: client.get_policy(job.agent_id, job.policy_version), summary
    )


# --- jobs ------------------------------------------------------------------------------------------------


def _find_job(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(service, client, job) of args.job_id: the service --reward names, else the policy service; a job id
    the first does not know is looked up on the other one, and the user is told."""
    from rlhf.sdk.clients import PolicyClient, RewardClient

    order = ["reward", "policy"] if args.reward else ["policy", "reward"]
    clients = {"policy": PolicyClient(args.policy_addr), "reward": RewardClient(args.reward_addr)}
    for service in order:
        client = clients[service]
        try:
            job = client.get_job(args.job_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise service_error(service, client.address, error) from None
            continue
        if service != order[0]:
            flag = "--reward" if service == "reward" else "no --reward"
            output.note(f"note: {args.job_id} is a {_kind(service)} job (the {service} service; {flag} next time)")
        clients[order[1] if service == order[0] else order[0]].close()
        return service, client, job
    for client in clients.values():
        client.close()
    raise CliError(f"NOT_FOUND: no policy or reward-model training job {args.job_id}")


def _kind(service: str) -> str:
    return "reward-model" if service == "reward" else "policy"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import PolicyClient, RewardClient

    client = RewardClient(args.reward_addr) if args.reward else PolicyClient(args.policy_addr)
    with connected(client):
        jobs, _ = client.list_jobs(args.agent_id or "", page_size=args.limit)
    who = f" for {args.agent_id}" if args.agent_id else ""
    if args.reward:
        columns = ["job id", "agent", "state", "phase", "epoch", "step", "reward model", "created"]
        rows = (
            [
                j.job_id,
                j.agent_id,
                state_name(j),
                j.progress.phase,
                f"{j.progress.epoch}/{j.progress.total_epochs}" if j.progress.total_epochs else "",
                f"{j.progress.step}/{j.progress.total_steps}" if j.progress.total_steps else "",
                j.reward_model_version,
                output.timestamp(j, "created_at"),
            ]
            for j in jobs
        )
    else:
        columns = ["job id", "agent", "state", "phase", "step", "algorithm", "policy", "reward model", "created"]
        rows = (
            [
                j.job_id,
                j.agent_id,
                state_name(j),
                j.progress.phase,
                # a policy job's steps are its RL steps: none before the training phase
                f"{j.progress.step}/{j.progress.total_steps}"
                if j.progress.phase in ("training", "saving", "done")
                else "",
                _algorithm_name(j),
                j.policy_version,  # set only once the job SUCCEEDED
                j.reward_model_version,
                output.timestamp(j, "created_at"),
            ]
            for j in jobs
        )
    output.show_table(
        columns, rows, args.json, jobs, empty=f"no {_kind('reward' if args.reward else 'policy')} jobs{who}"
    )
    return 0


def _algorithm_name(job: Any) -> str:
    name = type(job).DESCRIPTOR.fields_by_name["algorithm"].enum_type.values_by_number[job.algorithm].name
    return name[len("ALGORITHM_") :].lower().replace("unspecified", "ppo")


def cmd_jobs_show(args: argparse.Namespace) -> int:
    service, client, job = _find_job(args)
    with connected(client):
        output.show_object(job, args.json, title=f"{_kind(service)} job {job.job_id}")
    return 0


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    service, client, job = _find_job(args)
    with connected(client):
        if service == "policy":
            return _follow_policy_job(client, job, args, f"watching policy job {job.job_id}")
        job = _watch(
            lambda: watch_reward_job(client, job.job_id), job.job_id, f"watching reward-model job {job.job_id}"
        )
        return _reward_outcome(client, job, args.json)


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    service, client, job = _find_job(args)
    with connected(client):
        job = client.cancel_job(job.job_id)
    if args.json:
        output.print_json(job)
    else:
        output.stdout().print(
            f"cancel requested: {_kind(service)} job {job.job_id} is {state_name(job)} (it stops within a step)",
            markup=False,
        )
    return 0


def cmd_jobs_resume(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import PolicyClient

    with connected(PolicyClient(args.policy_addr)) as client:
        job = client.resume_job(args.job_id)
        return _follow_policy_job(client, job, args, f"job {job.job_id} resumed")


# --- reward models ---------------------------------------------------------------------------------------


def cmd_reward_models_list(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import RewardClient

    with connected(RewardClient(args.reward_addr)) as client:
        models = client.list_models(args.agent_id)
    output.show_table(
        ["version", "created", "feedback", "ratings", "comparisons", "validation"],
        (
            [
                m.version,
                output.timestamp(m, "created_at"),
                m.feedback_count,
                m.rating_count,
                m.comparison_count,
                _metrics(m.metrics),
            ]
            for m in models
        ),
        args.json,
        models,
        empty=f"{args.agent_id} has no reward models yet (rlhf reward-models train {args.agent_id})",
    )
    return 0


def _metrics(metrics: Any) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k != "validation_count")


def cmd_reward_models_show(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import RewardClient

    with connected(RewardClient(args.reward_addr)) as client:
        model = client.get_model(args.agent_id, args.version or "")
    output.show_object(model, args.json, title=f"reward model {model.agent_id} {model.version}")
    return 0


def cmd_reward_models_train(args: argparse.Namespace) -> int:
    from rlhf.reward.v1 import reward_service_pb2 as rw
    from rlhf.sdk.clients import RewardClient

    config = rw.RewardModelConfig()
    if args.config:
        read_config(args.config, config)
    with connected(RewardClient(args.reward_addr)) as client:
        job = client.create_job(args.agent_id, config)
        if args.no_watch:
            _queued(job, args.json)
            return 0
        job = _watch(lambda: watch_reward_job(client, job.job_id), job.job_id, f"reward-model job {job.job_id} started")
        return _reward_outcome(client, job, args.json)


def _reward_outcome(client: Any, job: Any, as_json: bool) -> int:
    def summary(model: Any) -> list[str]:
        return [
            f"trained reward model {model.agent_id} {model.version} (job {job.job_id}{_duration(job)})",
            f"  feedback      {model.feedback_count} items ({model.rating_count} ratings, "
            f"{model.comparison_count} comparisons)",
            f"  validation    {_metrics(model.metrics) or 'none (too little feedback to hold some out)'}",
            f"  model         {model.model_path}",
            f"  use it        rlhf train {model.agent_id} --reward-model-version {model.version}",
        ]

    return _outcome(
        job,
        "reward-model",
        as_json,
        "reward_model",
        lambda: client.get_model(job.agent_id, job.reward_model_version),
        summary,
    )


# --- parsers ---------------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    train = client_parser(
        sub,
        "train",
        "train an agent's policy (reward model first, then RL), or estimate it with --dry-run",
        cmd_train,
        ["policy", "reward"],
        description=(
            "Train an agent's policy: the reward service trains a reward model on the agent's feedback (at\n"
            "least 10 items), then the policy service runs RL against it, and the result is registered as a\n"
            "new policy version. Shows each phase's progress and ends with a summary.\n\n" + CONFIG_EXAMPLE
        ),
    )
    train.add_argument("agent_id", help="the agent whose policy is trained")
    train.add_argument("--algorithm", choices=ALGORITHMS, default="ppo", help="the RL algorithm")
    train.add_argument("--dry-run", action="store_true", help="check and estimate time and memory; train nothing")
    train.add_argument("--max-steps", type=int, help="RL steps (default: the config's max_steps, 1000)")
    train.add_argument("--learning-rate", type=float, help="overrides the config's learning_rate (default 1e-5)")
    train.add_argument(
        "--reward-model-version", help="reuse this reward model ('latest' for the newest) instead of training one"
    )
    train.add_argument("--config", metavar="FILE", help="JSON file with a TrainingConfig (see above)")
    train.add_argument("--reward-config", metavar="FILE", help="JSON file with a RewardModelConfig")
    train.add_argument("--no-watch", action="store_true", help="return once the job is queued")

    jobs = subcommands(
        add_parser(sub, "jobs", "training jobs (policy jobs; --reward for reward-model jobs)"), "actions"
    )
    for name, func, help_text in (
        ("list", cmd_jobs_list, "list jobs, newest first"),
        ("show", cmd_jobs_show, "one job with its configuration, progress and error"),
        ("watch", cmd_jobs_watch, "follow a job until it ends, then summarise it"),
        ("cancel", cmd_jobs_cancel, "ask a job to stop (it keeps a checkpoint)"),
    ):
        job_parser = client_parser(jobs, name, help_text, func, ["policy", "reward"])
        job_parser.add_argument(
            "--reward",
            action="store_true",
            help="reward-model jobs (a job id of the other kind is still found, with a note)",
        )
        if name == "list":
            job_parser.add_argument("--agent-id", help="only this agent's jobs (default: every agent's)")
            job_parser.add_argument("--limit", type=int, default=50, help="at most this many jobs")
        else:
            job_parser.add_argument("job_id", help="the job's id (rlhf jobs list)")
    resume = client_parser(
        jobs,
        "resume",
        "continue an interrupted, failed or cancelled policy job from its last checkpoint",
        cmd_jobs_resume,
        ["policy", "reward"],
    )
    resume.add_argument("job_id", help="the policy job's id")
    resume.add_argument("--no-watch", action="store_true", help="return once the job is queued")

    reward_models = subcommands(add_parser(sub, "reward-models", "train and inspect reward models"), "actions")
    rtrain = client_parser(
        reward_models,
        "train",
        "train a reward model on an agent's feedback (at least 10 items)",
        cmd_reward_models_train,
        ["reward"],
        description=(
            "Train a reward model on an agent's feedback (at least 10 items): ratings train a regression head,\n"
            "comparisons a Bradley-Terry one. Shows progress and ends with the validation metrics.\n\n"
            "example --config file (a RewardModelConfig; unset fields keep their defaults):\n"
            '  {"use_lora": false, "num_epochs": 6, "learning_rate": 5e-4, "batch_size": 16}'
        ),
    )
    rtrain.add_argument("agent_id", help="the agent")
    rtrain.add_argument("--config", metavar="FILE", help="JSON file with a RewardModelConfig")
    rtrain.add_argument("--no-watch", action="store_true", help="return once the job is queued")
    rlist = client_parser(
        reward_models, "list", "an agent's reward models, newest first", cmd_reward_models_list, ["reward"]
    )
    rlist.add_argument("agent_id", help="the agent")
    rshow = client_parser(
        reward_models, "show", "one reward model: data, validation metrics, config", cmd_reward_models_show, ["reward"]
    )
    rshow.add_argument("agent_id", help="the agent")
    rshow.add_argument("version", nargs="?", default="", help="e.g. v2 (default: the latest)")
