//! Continual-learning scenarios: how one dataset becomes a sequence of tasks.
//!
//! - Split (class-incremental data, task-incremental heads): the classes in id order cut into
//!   equal groups, one per task; labels are renumbered 0..C-1 by position in the group.
//! - Permuted: every task sees all classes through its own fixed pixel permutation of the
//!   whole normalised sample, drawn from `SplitMix64::fork(seed, t)` (task 0 is permuted too).
//! - Rotated: every task sees all classes rotated by `t * step_deg` degrees.
//!
//! A [`TaskView`] holds indices into a [`Dataset`], not samples, so building a task costs a
//! pass over the labels; [`batches`] and [`TaskView::load_batch`] turn it into batches.

use std::sync::Arc;

use super::{DataError, Dataset, Transform};
use crate::rng::SplitMix64;

/// A sequence of tasks over one dataset.
#[derive(Clone, Debug, PartialEq)]
pub enum Scenario {
    Split { tasks: usize },
    Permuted { tasks: usize, seed: u64 },
    Rotated { tasks: usize, step_deg: f32 },
}

impl Scenario {
    /// The number of tasks.
    pub fn tasks(&self) -> usize {
        match *self {
            Scenario::Split { tasks } | Scenario::Permuted { tasks, .. } | Scenario::Rotated { tasks, .. } => tasks,
        }
    }
}

/// One task's view of a dataset.
#[derive(Clone, Debug)]
pub struct TaskView {
    /// Indices into the dataset, ascending.
    pub indices: Vec<usize>,
    /// The task's label of each index, `0..classes.len()`.
    pub labels: Vec<u32>,
    /// The source class ids of the task: task label `i` is source class `classes[i]`.
    pub classes: Vec<u32>,
    pub transform: Transform,
}

/// One task: its name (`split5-t1`, `permuted10-t0`, `rotated5-t2`; safe as a file name),
/// train and test views, and class names in task-label order.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub name: String,
    pub train: TaskView,
    pub test: TaskView,
    pub class_names: Vec<String>,
}

/// Builds task `t` of `s` over `(train, test)` with the base transform `base`.
///
/// Split needs the class count to be a multiple of `tasks` with at least two classes per
/// task. Permuted replaces `base.permutation`; Rotated replaces `base.rotate_deg`.
pub fn task(s: &Scenario, t: usize, train: &Dataset, test: &Dataset, base: &Transform) -> Result<TaskData, DataError> {
    let tasks = s.tasks();
    if t >= tasks {
        return Err(DataError(format!("task {t} asked for, the scenario has {tasks} tasks (0..{tasks})")));
    }
    let nc = train.num_classes();
    if test.num_classes() != nc {
        return Err(DataError(format!(
            "{} has {nc} classes but {} has {}; train and test must come from the same source",
            train.name(),
            test.name(),
            test.num_classes()
        )));
    }
    let all: Vec<u32> = (0..nc as u32).collect();
    let mut transform = base.clone();
    let (name, classes) = match *s {
        Scenario::Split { tasks } => {
            if !nc.is_multiple_of(tasks) || nc / tasks < 2 {
                return Err(DataError(format!(
                    "{}: {nc} classes cannot be split into {tasks} tasks of equal size with at least 2 classes \
                     each; choose a task count that divides {nc} and is at most {}",
                    train.name(),
                    nc / 2
                )));
            }
            let group = (nc / tasks) as u32;
            let first = t as u32 * group;
            (format!("split{tasks}-t{t}"), (first..first + group).collect())
        }
        Scenario::Permuted { tasks, seed } => {
            transform.check()?;
            let mut perm: Vec<u32> = (0..transform.sample_len() as u32).collect();
            SplitMix64::fork(seed, t as u64).shuffle(&mut perm);
            transform.permutation = Some(Arc::new(perm));
            (format!("permuted{tasks}-t{t}"), all)
        }
        Scenario::Rotated { tasks, step_deg } => {
            transform.rotate_deg = t as f32 * step_deg;
            (format!("rotated{tasks}-t{t}"), all)
        }
    };
    let class_names = classes.iter().map(|&c| train.class_names()[c as usize].clone()).collect();
    Ok(TaskData {
        name,
        train: classes_view(train, &classes, &transform)?,
        test: classes_view(test, &classes, &transform)?,
        class_names,
    })
}

/// The samples of `classes` (source class ids, e.g. from `--classes 3,1`) with labels
/// renumbered in the order given: class `classes[i]` gets label `i`. Fails on an empty list,
/// a repeated or unknown class, or when `ds` holds no sample of any of them.
pub fn classes_view(ds: &Dataset, classes: &[u32], t: &Transform) -> Result<TaskView, DataError> {
    let nc = ds.num_classes();
    if classes.is_empty() {
        return Err(DataError("no classes chosen; list at least one class id".into()));
    }
    let mut label_of = vec![None; nc];
    for (i, &c) in classes.iter().enumerate() {
        match label_of.get_mut(c as usize) {
            None => {
                return Err(DataError(format!(
                    "class {c} is not one of the {nc} classes of {} (ids 0..{})",
                    ds.name(),
                    nc.saturating_sub(1)
                )))
            }
            Some(Some(_)) => return Err(DataError(format!("class {c} is listed twice"))),
            Some(slot) => *slot = Some(i as u32),
        }
    }
    let (mut indices, mut labels) = (Vec::new(), Vec::new());
    for (i, &l) in ds.labels().iter().enumerate() {
        if let Some(Some(task_label)) = label_of.get(l as usize) {
            indices.push(i);
            labels.push(*task_label);
        }
    }
    if indices.is_empty() {
        return Err(DataError(format!("{} holds no sample of classes {classes:?}", ds.name())));
    }
    Ok(TaskView { indices, labels, classes: classes.to_vec(), transform: t.clone() })
}

/// Splits the positions `0..view.len()` into batches of `batch` (at least 1), shuffled by
/// `shuffle` when given; the last batch may be shorter.
pub fn batches(view: &TaskView, batch: usize, shuffle: Option<&mut SplitMix64>) -> Vec<Vec<usize>> {
    let mut pos: Vec<usize> = (0..view.indices.len()).collect();
    if let Some(rng) = shuffle {
        rng.shuffle(&mut pos);
    }
    pos.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

impl TaskView {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Loads the samples at `positions` (into this view) with the view's transform: inputs
    /// into `x` (`positions.len() * transform.sample_len()` values) and task labels into `y`
    /// (`positions.len()` values).
    pub fn load_batch(
        &self,
        ds: &Dataset,
        positions: &[usize],
        rng: Option<&mut SplitMix64>,
        x: &mut [f32],
        y: &mut [u32],
    ) -> Result<(), DataError> {
        if y.len() != positions.len() {
            return Err(DataError(format!("{} labels asked for into room for {}", positions.len(), y.len())));
        }
        let mut idx = Vec::with_capacity(positions.len());
        for (&p, y) in positions.iter().zip(y.iter_mut()) {
            let (Some(&i), Some(&l)) = (self.indices.get(p), self.labels.get(p)) else {
                return Err(DataError(format!("position {p} asked for, the task view has {}", self.len())));
            };
            idx.push(i);
            *y = l;
        }
        ds.load(&idx, &self.transform, rng, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Source, Split};

    fn embedded() -> (Dataset, Dataset) {
        (
            Dataset::open(&Source::Embedded, Split::Train).unwrap(),
            Dataset::open(&Source::Embedded, Split::Test).unwrap(),
        )
    }

    fn base() -> Transform {
        Transform::new(1, 28, 28, [0.286; 4], [0.353; 4])
    }

    #[test]
    fn split_task_one_of_five_is_classes_two_and_three_as_zero_and_one() {
        let (train, test) = embedded();
        let d = task(&Scenario::Split { tasks: 5 }, 1, &train, &test, &base()).unwrap();
        assert_eq!(d.name, "split5-t1");
        assert_eq!(d.class_names, ["Pullover", "Dress"]);
        for (view, ds, per) in [(&d.train, &train, 500), (&d.test, &test, 100)] {
            assert_eq!(view.classes, [2, 3]);
            assert_eq!(view.len(), 2 * per);
            assert!(view.indices.windows(2).all(|w| w[0] < w[1]));
            for (&i, &l) in view.indices.iter().zip(&view.labels) {
                assert_eq!(ds.label(i), l + 2);
            }
            assert_eq!(view.labels.iter().filter(|&&l| l == 0).count(), per);
        }
        // Batches carry the task labels and the samples.
        let (mut x, mut y) = (vec![0.0; 2 * 784], [9u32; 2]);
        d.train.load_batch(&train, &[0, 5], None, &mut x, &mut y).unwrap();
        assert_eq!(y, [d.train.labels[0], d.train.labels[5]]);
        let mut direct = vec![0.0; 784];
        train.load(&[d.train.indices[5]], &base(), None, &mut direct).unwrap();
        assert_eq!(x[784..], direct[..]);
        assert!(d.train.load_batch(&train, &[1000], None, &mut x[..784], &mut y[..1]).is_err());
    }

    #[test]
    fn split_rejects_uneven_or_single_class_tasks() {
        let (train, test) = embedded();
        for tasks in [3, 10, 0] {
            assert!(task(&Scenario::Split { tasks }, 0, &train, &test, &base()).is_err(), "{tasks} tasks");
        }
        let e = task(&Scenario::Split { tasks: 2 }, 2, &train, &test, &base()).unwrap_err().0;
        assert!(e.contains("task 2"), "{e}");
        let d = task(&Scenario::Split { tasks: 2 }, 1, &train, &test, &base()).unwrap();
        assert_eq!(d.train.classes, [5, 6, 7, 8, 9]);
    }

    #[test]
    fn permuted_tasks_are_permutations_that_differ_per_task() {
        let (train, test) = embedded();
        let s = Scenario::Permuted { tasks: 3, seed: 42 };
        let perms: Vec<Vec<u32>> = (0..3)
            .map(|t| {
                let d = task(&s, t, &train, &test, &base()).unwrap();
                assert_eq!(d.train.len(), 5000);
                assert_eq!(d.train.classes, (0..10).collect::<Vec<_>>());
                assert_eq!(d.train.labels, train.labels());
                d.train.transform.permutation.unwrap().to_vec()
            })
            .collect();
        for p in &perms {
            let mut sorted = p.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..784).collect::<Vec<u32>>());
            assert!(p.iter().enumerate().filter(|&(i, &v)| i as u32 != v).count() > 700, "task 0 is permuted too");
        }
        assert_ne!(perms[0], perms[1]);
        assert_ne!(perms[1], perms[2]);
        // Same seed, same task: same permutation.
        let again = task(&s, 1, &train, &test, &base()).unwrap();
        assert_eq!(**again.test.transform.permutation.as_ref().unwrap(), perms[1]);
    }

    #[test]
    fn rotated_tasks_turn_by_multiples_of_the_step() {
        let (train, test) = embedded();
        let s = Scenario::Rotated { tasks: 4, step_deg: 15.0 };
        for t in 0..4 {
            let d = task(&s, t, &train, &test, &base()).unwrap();
            assert_eq!(d.train.transform.rotate_deg, 15.0 * t as f32);
            assert_eq!(d.test.len(), 1000);
        }
    }

    #[test]
    fn classes_view_renumbers_in_the_order_given() {
        let (train, _) = embedded();
        let v = classes_view(&train, &[7, 0], &base()).unwrap();
        assert_eq!(v.len(), 1000);
        for (&i, &l) in v.indices.iter().zip(&v.labels) {
            assert_eq!(train.label(i), [7, 0][l as usize]);
        }
        assert!(classes_view(&train, &[], &base()).is_err());
        assert!(classes_view(&train, &[1, 1], &base()).unwrap_err().0.contains("twice"));
        assert!(classes_view(&train, &[10], &base()).unwrap_err().0.contains("class 10"));
    }

    #[test]
    fn batches_cover_every_position_once() {
        let (train, _) = embedded();
        let v = classes_view(&train, &[0], &base()).unwrap();
        let plain = batches(&v, 128, None);
        assert_eq!(plain.len(), 4);
        assert_eq!(plain[3].len(), 500 - 3 * 128);
        assert_eq!(plain.concat(), (0..500).collect::<Vec<_>>());
        let shuffled = |seed| batches(&v, 128, Some(&mut SplitMix64::new(seed))).concat();
        let mut s = shuffled(1);
        assert_eq!(s, shuffled(1));
        assert_ne!(s, shuffled(2));
        assert_ne!(s, plain.concat());
        s.sort_unstable();
        assert_eq!(s, (0..500).collect::<Vec<_>>());
        assert_eq!(batches(&v, 0, None).len(), 500);
    }
}
