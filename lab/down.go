package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"
)

// Down removes the lab: its processes, namespaces (and so every link in
// them), bpffs pins, cgroups and directory. It works from the state file
// and, for whatever a crash kept out of it, from the lab's names: every
// namespace named tl-<name>-*, the cgroup trellis-lab-<name>, pins under
// BPFRoot/<name>-*, and any process inside those namespaces or cgroups
// (the lab started them all). Down of a lab that is not there does
// nothing and succeeds.
func Down(ctx context.Context, opts Options) error {
	if err := requireRoot(); err != nil {
		return err
	}
	if err := opts.complete(); err != nil {
		return err
	}
	lock, err := lockLab(opts)
	if err != nil {
		return err
	}
	l := &lab{opts: opts, dir: filepath.Join(opts.BaseDir, opts.Name), lock: lock, log: opts.Log.With("lab", opts.Name)}
	defer func() {
		l.close()
		os.Remove(filepath.Join(opts.BaseDir, opts.Name+".lock"))
		os.Remove(opts.BaseDir) // only when no other lab is left in it
	}()
	st, err := loadState(l.dir)
	switch {
	case err == nil:
		l.state = st
	case errors.Is(err, os.ErrNotExist):
	default:
		l.log.Warn("state file unreadable; cleaning up by name", "err", err)
	}
	return l.teardown()
}

// downResult counts what teardown removed.
type downResult struct {
	procs, namespaces, pins int
	cgroup                  bool
}

// teardown removes everything of the lab it can find; it reports what it
// could not remove.
func (l *lab) teardown() error {
	name := l.opts.Name
	var errs []error
	var res downResult

	// What to remove: the state's record plus everything named like it.
	namespaces, err := listNetNS(nsPrefix(name))
	if err != nil {
		errs = append(errs, fmt.Errorf("lab: list namespaces: %w", err))
	}
	var cgroupRoots, pinDirs []string
	procs := map[int]uint64{}
	// A state file is trusted only for names the lab could have made.
	if st := l.state; st != nil {
		for _, ns := range st.Namespaces {
			if strings.HasPrefix(ns, nsPrefix(name)) && !slices.Contains(namespaces, ns) && netnsExists(ns) {
				namespaces = append(namespaces, ns)
			}
		}
		if filepath.Base(st.CgroupRoot) == cgroupDirName(name) {
			cgroupRoots = append(cgroupRoots, st.CgroupRoot)
		}
		for _, p := range st.PinDirs {
			if filepath.Dir(p) == BPFRoot && strings.HasPrefix(filepath.Base(p), pinPrefix(name)) {
				pinDirs = append(pinDirs, p)
			}
		}
		for _, p := range st.Procs {
			if p.Alive() {
				procs[p.PID] = p.Start
			}
		}
	}
	if cg2, err := cgroup2Root(); err == nil {
		if root := filepath.Join(cg2, cgroupDirName(name)); !slices.Contains(cgroupRoots, root) {
			cgroupRoots = append(cgroupRoots, root)
		}
	}
	if pins, err := filepath.Glob(filepath.Join(BPFRoot, pinPrefix(name)+"*")); err == nil {
		for _, p := range pins {
			if !slices.Contains(pinDirs, p) {
				pinDirs = append(pinDirs, p)
			}
		}
	}

	// 1. Processes: the recorded ones, and any other inside the lab's
	// cgroups or namespaces (children of lab processes, `lab exec`).
	for _, root := range cgroupRoots {
		for _, pid := range cgroupPIDs(root) {
			if start, ok := procStart(pid); ok && pid != os.Getpid() {
				procs[pid] = start
			}
		}
	}
	for pid, start := range netnsPIDs(namespaces) {
		procs[pid] = start
	}
	if len(procs) > 0 {
		pids := make([]int, 0, len(procs))
		for pid := range procs {
			pids = append(pids, pid)
		}
		sort.Ints(pids)
		l.log.Info("stopping lab processes", "pids", pids)
		if left := stopProcs(procs, 5*time.Second); len(left) > 0 {
			errs = append(errs, fmt.Errorf("lab: processes %v do not die", left))
		}
		res.procs = len(procs)
	}

	// 2. Pins: unpinning the agents' links detaches their programs.
	for _, p := range pinDirs {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, fmt.Errorf("lab: remove pins %s: %w", p, err))
			continue
		}
		res.pins++
	}

	// 3. Namespaces; their links (veths, bridge, tunnel devices) go with
	// them.
	sort.Strings(namespaces)
	for _, ns := range namespaces {
		if err := deleteNetNS(ns); err != nil {
			errs = append(errs, err)
			continue
		}
		res.namespaces++
	}

	// 4. Cgroups, deepest first.
	for _, root := range cgroupRoots {
		if _, err := os.Stat(root); err != nil {
			continue
		}
		if err := removeCgroupTree(root); err != nil {
			errs = append(errs, err)
			continue
		}
		res.cgroup = true
	}

	// 5. Files.
	if err := os.RemoveAll(l.dir); err != nil {
		errs = append(errs, fmt.Errorf("lab: remove %s: %w", l.dir, err))
	}

	if len(errs) == 0 && res.procs+res.namespaces+res.pins == 0 && !res.cgroup {
		fmt.Fprintf(l.opts.Out, "lab %s: nothing to remove\n", name)
		return nil
	}
	fmt.Fprintf(l.opts.Out, "lab %s removed: %d processes, %d namespaces (with their links), %d pin dirs, cgroup %s\n",
		name, res.procs, res.namespaces, res.pins, yesNo(res.cgroup))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w\n(run `trellis lab down --name %s` again once the cause is fixed)", err, name)
	}
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
