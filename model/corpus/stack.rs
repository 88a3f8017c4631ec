/// A bounded stack that refuses pushes once it is full.
pub struct Stack<T> {
    items: Vec<T>,
    limit: usize,
}

impl<T> Stack<T> {
    pub fn new(limit: usize) -> Self {
        Stack { items: Vec::with_capacity(limit), limit }
    }

    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.items.len() >= self.limit {
            return Err(item);
        }
        self.items.push(item);
        Ok(())
    }

    pub fn pop(&mut self) -> Option<T> {
        self.items.pop()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
