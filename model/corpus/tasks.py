from dataclasses import dataclass, field

STATUS_LABELS = {"done": "完了 🎉", "todo": "未着手", "wip": "作業中"}


@dataclass
class Task:
    title: str
    status: str = "todo"
    tags: list[str] = field(default_factory=list)

    def label(self) -> str:
        return STATUS_LABELS.get(self.status, "不明")

    def finish(self) -> None:
        self.status = "done"
        print(f"🎉 {self.title} を完了しました")


def summarize(tasks: list[Task]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.status] = counts.get(task.status, 0) + 1
    return counts


def render(tasks: list[Task]) -> str:
    # 日本語のラベルで一覧を表示する
    lines = [f"- {t.title} [{t.label()}]" for t in tasks]
    return "\n".join(lines)
