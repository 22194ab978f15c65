package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// State is what a lab records in <dir>/state.json: its topology, and
// everything it created, written before (namespaces, cgroups, pin dirs) or
// right after (processes) it is created, so that `down` finds it after a
// crash. `down` also looks for leftovers by name, so a state file lost
// before its first write leaves nothing behind either.
type State struct {
	Name     string    `json:"name"`
	Created  time.Time `json:"created"`
	Phase    string    `json:"phase"` // creating, up
	Topology Topology  `json:"topology"`
	// Cgroup2 is the cgroup v2 mount point; CgroupRoot the lab's cgroup.
	Cgroup2    string   `json:"cgroup2"`
	CgroupRoot string   `json:"cgroupRoot"`
	Namespaces []string `json:"namespaces"`
	PinDirs    []string `json:"pinDirs"`
	// Procs are the processes the lab started, by role key
	// (apiserver/eu, agent/eu/n1, echo/eu/echo-n1).
	Procs map[string]*Proc `json:"procs"`
	// Datapath is true when the agents run with the datapath flags
	// (agentDatapathArgs): always, for a lab this version built. It is
	// false only in the state of a lab that an older trellis ran without
	// them, whose agents keep restarting the way they started.
	Datapath bool `json:"datapath"`
	// StoppedPods ("eu/echo-n1") and DownNodes ("eu/n1") were taken out
	// with `lab pod stop` and `lab node down`.
	StoppedPods map[string]bool `json:"stoppedPods,omitempty"`
	DownNodes   map[string]bool `json:"downNodes,omitempty"`
	// Disconnected are the pairs of clusters separated with `lab
	// disconnect` ("eu/us", names in order); every other pair is joined.
	Disconnected map[string]bool `json:"disconnected,omitempty"`
	// Kubernetes is set for a lab built with `up --kubernetes`
	// (kubernetes.go): each cluster runs a kube-apiserver, its mesh API
	// server the Kubernetes source, its agents --kubernetes, and the
	// verbs write through the Kubernetes API.
	Kubernetes bool `json:"kubernetes,omitempty"`
}

// pairKey names a pair of clusters in State.Disconnected.
func pairKey(a, b string) string {
	if b < a {
		a, b = b, a
	}
	return a + "/" + b
}

// joined says whether clusters a and b are connected (a cluster always
// is to itself).
func (st *State) joined(a, b string) bool {
	return a == b || !st.Disconnected[pairKey(a, b)]
}

// Proc is a process the lab started.
type Proc struct {
	PID int `json:"pid"`
	// Start is the start time from /proc/<pid>/stat, so that a PID reused
	// by another process is never signalled.
	Start uint64   `json:"start"`
	Argv  []string `json:"argv"`
	Log   string   `json:"log,omitempty"`
}

// Alive says whether the process still runs.
func (p *Proc) Alive() bool { return p != nil && alive(p.PID, p.Start) }

// Options name a lab and say where its files are.
type Options struct {
	// Name is the lab's name (DefaultName when empty).
	Name string
	// BaseDir holds the labs' directories (BaseDir when empty).
	BaseDir string
	// Binary is the trellis binary the lab runs (this executable when
	// empty).
	Binary string
	// Out receives tables and progress; Log diagnostics.
	Out io.Writer
	Log *slog.Logger
}

func (o *Options) complete() error {
	if o.Name == "" {
		o.Name = DefaultName
	}
	if err := ValidateName(o.Name); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	if o.BaseDir == "" {
		o.BaseDir = BaseDir
	}
	if o.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("lab: find the trellis binary: %w", err)
		}
		o.Binary = exe
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return nil
}

// requireRoot refuses to run unprivileged, with the reason.
func requireRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("lab: needs root (network namespaces, cgroups and eBPF): run it with sudo")
	}
	return nil
}

// lab is an open lab: its state, layout and lock.
type lab struct {
	opts  Options
	dir   string
	state *State
	lay   *layout
	lock  *os.File
	log   *slog.Logger
}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

// lockLab takes the lab's lock (a file beside its directory, so that
// `down` can remove the directory while holding it). Verbs that change a
// lab hold it; two `lab up` of the same name cannot interleave.
func lockLab(opts Options) (*os.File, error) {
	if err := os.MkdirAll(opts.BaseDir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(opts.BaseDir, opts.Name+".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lab: lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lab: lock %s: %w", f.Name(), err)
		}
		opts.Log.Info("waiting for another lab command on this lab", "lab", opts.Name)
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lab: lock %s: %w", f.Name(), err)
		}
	}
	return f, nil
}

// openForChange is open for the verbs that change a lab: they need root
// and the lab's lock.
func openForChange(opts Options) (*lab, error) {
	if err := requireRoot(); err != nil {
		return nil, err
	}
	return open(opts, true)
}

// open loads an existing lab. With lock it holds the lab's lock until
// close.
func open(opts Options, lock bool) (*lab, error) {
	if err := opts.complete(); err != nil {
		return nil, err
	}
	l := &lab{opts: opts, dir: filepath.Join(opts.BaseDir, opts.Name), log: opts.Log.With("lab", opts.Name)}
	if lock {
		f, err := lockLab(opts)
		if err != nil {
			return nil, err
		}
		l.lock = f
	}
	st, err := loadState(l.dir)
	if err != nil {
		l.close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("lab %s is not up (no %s): start it with `trellis lab up --name %s`", opts.Name, statePath(l.dir), opts.Name)
		}
		return nil, err
	}
	l.state = st
	if err := st.Topology.Validate(); err != nil {
		l.close()
		return nil, fmt.Errorf("lab: %s: %w", statePath(l.dir), err)
	}
	lay, err := newLayout(opts.Name, opts.BaseDir, st.Cgroup2, &st.Topology)
	if err != nil {
		l.close()
		return nil, err
	}
	l.lay = lay
	return l, nil
}

func (l *lab) close() {
	if l.lock != nil {
		l.lock.Close()
		l.lock = nil
	}
}

func loadState(dir string) (*State, error) {
	data, err := os.ReadFile(statePath(dir))
	if err != nil {
		return nil, err
	}
	var st State
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("lab: %s: %w", statePath(dir), err)
	}
	if st.Procs == nil {
		st.Procs = map[string]*Proc{}
	}
	return &st, nil
}

// save writes the state atomically.
func (l *lab) save() error {
	data, err := json.MarshalIndent(l.state, "", "  ")
	if err != nil {
		return err
	}
	tmp := statePath(l.dir) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("lab: write state: %w", err)
	}
	if err := os.Rename(tmp, statePath(l.dir)); err != nil {
		return fmt.Errorf("lab: write state: %w", err)
	}
	return nil
}

// recordNS notes a namespace before it is created.
func (l *lab) recordNS(name string) error {
	if !slices.Contains(l.state.Namespaces, name) {
		l.state.Namespaces = append(l.state.Namespaces, name)
	}
	return l.save()
}

// recordProc notes a started process.
func (l *lab) recordProc(key string, pid int, argv []string, log string) error {
	start, _ := procStart(pid)
	l.state.Procs[key] = &Proc{PID: pid, Start: start, Argv: argv, Log: log}
	return l.save()
}

// Process keys.
func apiKey(c *clusterLayout) string { return "apiserver/" + c.Name }
func agentKey(n *nodeLayout) string  { return "agent/" + n.ref() }
func echoKey(p *podLayout) string    { return "echo/" + p.ref() }
