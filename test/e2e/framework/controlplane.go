// Package framework runs a real Kubernetes control plane (etcd, kube-apiserver,
// kube-scheduler and kube-controller-manager) as local processes on 127.0.0.1 for
// end-to-end tests of the vfio.dra.dev driver, and offers helpers to create
// objects and wait for the scheduler.
//
// The binaries come from hack/build-control-plane.sh; the directory that holds
// them is passed in the VFIO_E2E_BIN_DIR environment variable (run.sh sets it).
// Without a real node (StartRealNode: kubelet, containerd, runc, CNI) tests
// create Node objects themselves and the pods they create are scheduled and
// bound, but never run.
package framework

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// BinDirEnv is the environment variable that names the directory with the etcd,
// kube-apiserver, kube-scheduler, kube-controller-manager and kubectl binaries.
const BinDirEnv = "VFIO_E2E_BIN_DIR"

// ControlPlaneBinaries are the files that must exist in the directory named by
// BinDirEnv.
var ControlPlaneBinaries = []string{"etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubectl"}

// DefaultControllers are the kube-controller-manager controllers that run unless
// Options.Controllers says otherwise. resourceclaim-controller creates claims from
// templates, clears reservedFor and deallocates claims of pods that are gone (also
// the claims the scheduler creates for extended resources); the garbage collector
// deletes generated claims whose pod was deleted, as in a real cluster.
var DefaultControllers = []string{"resourceclaim-controller", "garbage-collector-controller"}

// logTailLines is how much of each component's log a failed test prints.
const logTailLines = 100

// Options change how the control plane is started. The zero value is fine.
type Options struct {
	// BinDir overrides the directory named by BinDirEnv.
	BinDir string
	// Controllers is the kube-controller-manager --controllers list; nil means
	// DefaultControllers.
	Controllers []string
	// Extra flags, appended after the framework's own.
	EtcdArgs, APIServerArgs, SchedulerArgs, ControllerManagerArgs []string
	// StartTimeout limits how long each component may take to become ready; 0
	// means two minutes (generous, because CI machines can be busy).
	StartTimeout time.Duration
	// ServiceAccounts runs what pods with service accounts need, as in a
	// production cluster: Node and RBAC authorization, the ServiceAccount
	// and NodeRestriction admission plugins, and the token, service-account,
	// root-CA and DaemonSet controllers.
	ServiceAccounts bool
}

// serviceAccountControllers run with Options.ServiceAccounts.
var serviceAccountControllers = []string{"serviceaccount-token-controller", "serviceaccount-controller", "root-ca-certificate-publisher-controller", "daemonset-controller"}

// ControlPlane is a running set of control-plane processes.
type ControlPlane struct {
	// BinDir holds the control-plane binaries.
	BinDir string
	// Dir holds the logs, the etcd data, the certificates and the kubeconfig. It
	// is removed by Stop unless the caller asks to keep it.
	Dir string
	// KubeconfigPath is a kubeconfig with cluster-admin rights (group
	// system:masters) for the apiserver.
	KubeconfigPath string
	// Config and Client use the same credentials as KubeconfigPath.
	Config *rest.Config
	Client kubernetes.Interface

	Etcd, APIServer, Scheduler, ControllerManager *Process

	pki *pki

	mu        sync.Mutex
	processes []*Process
	cleanups  []func()
}

// StartControlPlane starts a control plane for the test and registers a cleanup
// that stops it. When the test fails, the cleanup prints the tail of every log
// and keeps the directory with the full logs. Startup errors end the test.
func StartControlPlane(tb testing.TB, opts Options) *ControlPlane {
	tb.Helper()
	start := time.Now()
	cp, err := Start(context.Background(), opts)
	if cp != nil {
		tb.Cleanup(func() {
			cp.Stop()
			if tb.Failed() {
				tb.Logf("%s", cp.LogDump(logTailLines))
				tb.Logf("control-plane logs and data kept in %s", cp.Dir)
				return
			}
			if err := os.RemoveAll(cp.Dir); err != nil {
				tb.Errorf("remove control-plane directory: %v", err)
			}
		})
	}
	if err != nil {
		tb.Fatalf("start control plane: %v", err)
	}
	tb.Logf("control plane ready in %v (apiserver %s, logs in %s)", time.Since(start).Round(time.Millisecond), cp.Config.Host, cp.Dir)
	return cp
}

// Start starts etcd, kube-apiserver, kube-scheduler and kube-controller-manager
// and waits until each of them is ready. On error, the returned ControlPlane (if
// not nil) has to be stopped by the caller; its logs explain the failure.
func Start(ctx context.Context, opts Options) (*ControlPlane, error) {
	binDir := opts.BinDir
	if binDir == "" {
		binDir = os.Getenv(BinDirEnv)
	}
	if err := checkBinaries(binDir); err != nil {
		return nil, err
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 2 * time.Minute
	}
	if opts.Controllers == nil {
		opts.Controllers = DefaultControllers
	}

	dir, err := os.MkdirTemp("", "vfio-e2e-")
	if err != nil {
		return nil, fmt.Errorf("create control-plane directory: %w", err)
	}
	cp := &ControlPlane{BinDir: binDir, Dir: dir}
	cp.pki, err = newPKI(dir)
	if err != nil {
		return cp, fmt.Errorf("create certificates: %w", err)
	}

	etcdURL, err := cp.startEtcd(ctx, opts)
	if err != nil {
		return cp, err
	}
	if opts.ServiceAccounts {
		opts.Controllers = append(slices.Clone(opts.Controllers), serviceAccountControllers...)
		opts.APIServerArgs = append([]string{
			"--authorization-mode=Node,RBAC",
			"--enable-admission-plugins=NodeRestriction",
		}, opts.APIServerArgs...)
		opts.ControllerManagerArgs = append([]string{
			"--service-account-private-key-file=" + cp.pki.SAPrivateKey,
			"--root-ca-file=" + cp.pki.CAFile,
		}, opts.ControllerManagerArgs...)
	}
	if err := cp.startAPIServer(ctx, opts, etcdURL); err != nil {
		return cp, err
	}
	if err := cp.startScheduler(ctx, opts); err != nil {
		return cp, err
	}
	if err := cp.startControllerManager(ctx, opts); err != nil {
		return cp, err
	}
	return cp, nil
}

func checkBinaries(binDir string) error {
	if binDir == "" {
		return fmt.Errorf("%s is not set: it must name the directory that test/e2e/hack/build-control-plane.sh builds (run the tests with test/e2e/run.sh)", BinDirEnv)
	}
	var missing []string
	for _, name := range ControlPlaneBinaries {
		if _, err := os.Stat(filepath.Join(binDir, name)); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s=%s lacks %s: build them with test/e2e/hack/build-control-plane.sh", BinDirEnv, binDir, strings.Join(missing, ", "))
	}
	return nil
}

// StartProcess starts a process whose log lives with the control plane's and
// which Stop ends (in reverse start order, before the control plane itself).
// Use it for the driver's own binaries.
func (cp *ControlPlane) StartProcess(name, binary string, env []string, args ...string) (*Process, error) {
	p, err := StartProcess(cp.Dir, name, env, binary, args...)
	if err != nil {
		return nil, err
	}
	cp.mu.Lock()
	cp.processes = append(cp.processes, p)
	cp.mu.Unlock()
	return p, nil
}

// forget drops a process that was stopped after a failed start, so that its log
// is not dumped twice.
func (cp *ControlPlane) forget(p *Process) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.processes = slices.DeleteFunc(cp.processes, func(q *Process) bool { return q == p })
}

// AddCleanup registers a function that Stop calls, in reverse order of
// registration, before it ends the processes: a real node uses it to stop its
// pods and remove what it created on the host while the control plane still
// runs.
func (cp *ControlPlane) AddCleanup(f func()) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.cleanups = append(cp.cleanups, f)
}

// Stop runs the cleanups, then ends all processes in reverse start order. It
// may be called more than once. It leaves Dir in place; StartControlPlane
// removes it when the test passed.
func (cp *ControlPlane) Stop() {
	cp.mu.Lock()
	cleanups := cp.cleanups
	cp.cleanups = nil
	cp.mu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cp.mu.Lock()
	processes := append([]*Process(nil), cp.processes...)
	cp.mu.Unlock()
	for i := len(processes) - 1; i >= 0; i-- {
		processes[i].Stop()
	}
}

// LogDump returns the last lines of every process' log, in start order.
func (cp *ControlPlane) LogDump(lines int) string {
	cp.mu.Lock()
	processes := append([]*Process(nil), cp.processes...)
	cp.mu.Unlock()
	var b strings.Builder
	for _, p := range processes {
		fmt.Fprintf(&b, "===== last %d lines of %s (%s) =====\n%s\n", lines, p.Name, p.LogPath, p.LogTail(lines))
	}
	return b.String()
}

// Kubectl runs kubectl against the control plane and returns its standard
// output. The error includes standard error.
func (cp *ControlPlane) Kubectl(ctx context.Context, args ...string) (string, error) {
	return cp.KubectlWithInput(ctx, nil, args...)
}

// KubectlWithInput is Kubectl with stdin, for example for "apply -f -".
func (cp *ControlPlane) KubectlWithInput(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	args = append([]string{"--kubeconfig=" + cp.KubeconfigPath}, args...)
	cmd := exec.CommandContext(ctx, filepath.Join(cp.BinDir, "kubectl"), args...)
	cmd.Stdin = stdin
	var stdout, stderr strings.Builder
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args[1:], " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// startWithFreePorts runs start with n free loopback ports. Another process can
// take a port between the check and the bind; then start is retried with new
// ports.
func (cp *ControlPlane) startWithFreePorts(n int, start func(ports []int) (*Process, error)) (*Process, error) {
	const attempts = 3
	var lastErr error
	for range attempts {
		ports, err := freePorts(n)
		if err != nil {
			return nil, err
		}
		p, err := start(ports)
		if err == nil {
			return p, nil
		}
		lastErr = err
		if p == nil || !strings.Contains(p.LogTail(50), "address already in use") {
			return p, err
		}
		p.Stop()
		cp.forget(p)
	}
	return nil, lastErr
}

func (cp *ControlPlane) startEtcd(ctx context.Context, opts Options) (string, error) {
	var clientURL string
	p, err := cp.startWithFreePorts(2, func(ports []int) (*Process, error) {
		clientURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
		peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
		args := append([]string{
			"--name=e2e",
			"--data-dir=" + filepath.Join(cp.Dir, "etcd-data"),
			"--listen-client-urls=" + clientURL,
			"--advertise-client-urls=" + clientURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=e2e=" + peerURL,
			// Test data does not have to survive a power loss.
			"--unsafe-no-fsync",
			"--log-level=warn",
		}, opts.EtcdArgs...)
		p, err := cp.StartProcess("etcd", filepath.Join(cp.BinDir, "etcd"), nil, args...)
		if err != nil {
			return nil, err
		}
		return p, p.WaitReady(ctx, opts.StartTimeout, func(ctx context.Context) error {
			body, err := httpGet(ctx, http.DefaultClient, clientURL+"/health")
			if err != nil {
				return err
			}
			var health struct {
				Health string `json:"health"`
			}
			if err := json.Unmarshal(body, &health); err != nil {
				return fmt.Errorf("decode /health: %w", err)
			}
			if health.Health != "true" {
				return fmt.Errorf("/health: %s", body)
			}
			return nil
		})
	})
	cp.Etcd = p
	return clientURL, err
}

func (cp *ControlPlane) startAPIServer(ctx context.Context, opts Options, etcdURL string) error {
	token, err := randomToken()
	if err != nil {
		return err
	}
	tokenFile := filepath.Join(cp.Dir, "tokens.csv")
	if err := os.WriteFile(tokenFile, []byte(token+",e2e-admin,e2e-admin,system:masters\n"), 0o600); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}
	p, err := cp.startWithFreePorts(1, func(ports []int) (*Process, error) {
		host := fmt.Sprintf("https://127.0.0.1:%d", ports[0])
		if err := cp.writeKubeconfig(host, token); err != nil {
			return nil, err
		}
		args := append([]string{
			"--etcd-servers=" + etcdURL,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(ports[0]),
			"--tls-cert-file=" + cp.pki.ServingCert,
			"--tls-private-key-file=" + cp.pki.ServingKey,
			"--token-auth-file=" + tokenFile,
			"--authorization-mode=AlwaysAllow",
			"--service-account-key-file=" + cp.pki.SAPublicKey,
			"--service-account-signing-key-file=" + cp.pki.SAPrivateKey,
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-cluster-ip-range=10.0.0.0/24",
			// The default reconciler refuses a loopback advertise address.
			"--endpoint-reconciler-type=none",
			// Nothing creates service accounts, and nothing (no kubelet, no node
			// lifecycle controller) would remove the not-ready taint from Nodes.
			"--disable-admission-plugins=" + disabledAdmission(opts),
			// As in kubeadm, kind and managed clusters: the kubelet plugin's
			// DaemonSet must write sysfs, which needs a privileged container.
			"--allow-privileged=true",
			// A real node's kubelet (StartRealNode) is reached at its
			// InternalIP: its Hostname does not resolve.
			"--kubelet-preferred-address-types=InternalIP,Hostname",
		}, opts.APIServerArgs...)
		p, err := cp.StartProcess("kube-apiserver", filepath.Join(cp.BinDir, "kube-apiserver"), nil, args...)
		if err != nil {
			return nil, err
		}
		return p, p.WaitReady(ctx, opts.StartTimeout, func(ctx context.Context) error {
			body, err := cp.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
			if err != nil {
				return fmt.Errorf("/readyz: %w: %s", err, body)
			}
			// Tests create objects in it; the apiserver creates it shortly after start.
			_, err = cp.Client.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
			return err
		})
	})
	cp.APIServer = p
	return err
}

// disabledAdmission lists the admission plugins that the apiserver runs
// without: ServiceAccount unless Options.ServiceAccounts.
func disabledAdmission(opts Options) string {
	if opts.ServiceAccounts {
		return "TaintNodesByCondition"
	}
	return "ServiceAccount,TaintNodesByCondition"
}

func (cp *ControlPlane) writeKubeconfig(host, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: host, CertificateAuthorityData: cp.pki.CAData}
	cfg.AuthInfos["e2e-admin"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "e2e-admin"}
	cfg.CurrentContext = "e2e"
	cp.KubeconfigPath = filepath.Join(cp.Dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, cp.KubeconfigPath); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	restConfig, err := clientcmd.NewNonInteractiveClientConfig(*cfg, "e2e", nil, nil).ClientConfig()
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	// The defaults (5 QPS) slow down polling tests.
	restConfig.QPS = 100
	restConfig.Burst = 200
	client, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}
	cp.Config, cp.Client = restConfig, client
	return nil
}

func (cp *ControlPlane) startScheduler(ctx context.Context, opts Options) error {
	p, err := cp.startWithFreePorts(1, func(ports []int) (*Process, error) {
		args := append([]string{
			"--kubeconfig=" + cp.KubeconfigPath,
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(ports[0]),
			"--tls-cert-file=" + cp.pki.ServingCert,
			"--tls-private-key-file=" + cp.pki.ServingKey,
		}, opts.SchedulerArgs...)
		p, err := cp.StartProcess("kube-scheduler", filepath.Join(cp.BinDir, "kube-scheduler"), nil, args...)
		if err != nil {
			return nil, err
		}
		// /readyz includes the informer sync, so pods created afterwards are seen.
		return p, p.WaitReady(ctx, opts.StartTimeout, cp.healthCheck(ports[0], "/readyz"))
	})
	cp.Scheduler = p
	return err
}

func (cp *ControlPlane) startControllerManager(ctx context.Context, opts Options) error {
	p, err := cp.startWithFreePorts(1, func(ports []int) (*Process, error) {
		args := append([]string{
			"--kubeconfig=" + cp.KubeconfigPath,
			"--controllers=" + strings.Join(opts.Controllers, ","),
			"--leader-elect=false",
			"--use-service-account-credentials=false",
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(ports[0]),
			"--tls-cert-file=" + cp.pki.ServingCert,
			"--tls-private-key-file=" + cp.pki.ServingKey,
		}, opts.ControllerManagerArgs...)
		p, err := cp.StartProcess("kube-controller-manager", filepath.Join(cp.BinDir, "kube-controller-manager"), nil, args...)
		if err != nil {
			return nil, err
		}
		return p, p.WaitReady(ctx, opts.StartTimeout, cp.healthCheck(ports[0], "/healthz"))
	})
	cp.ControllerManager = p
	return err
}

// healthCheck returns a check for the anonymous health endpoints of
// kube-scheduler and kube-controller-manager, which serve the framework's
// certificate.
func (cp *ControlPlane) healthCheck(port int, path string) func(ctx context.Context) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cp.pki.CAData)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	url := fmt.Sprintf("https://127.0.0.1:%d%s", port, path)
	return func(ctx context.Context) error {
		body, err := httpGet(ctx, client, url)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(body)) != "ok" {
			return fmt.Errorf("%s: %s", path, body)
		}
		return nil
	}
}

func httpGet(ctx context.Context, client *http.Client, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("GET %s: %s: %s", url, resp.Status, body)
	}
	return body, nil
}

// freePorts returns n distinct TCP ports on 127.0.0.1 that were free a moment ago.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		// Keep it open until all are chosen so that they differ.
		defer func() { _ = l.Close() }()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomToken() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("create token: %w", err)
	}
	return hex.EncodeToString(b), nil
}
