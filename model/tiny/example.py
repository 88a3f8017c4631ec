
    def label(self) -> str:
        

    def finish(self) -> None:
