/// Options that describe how one flotilla-vmm process runs rather than what VM it runs.
///
/// These are Table 3 of the reference (`-api-channel`, `-D`, `-pidfile`, `-disable-seccomp`,
/// `-daemonize`): they exist on the command line only and are never part of the JSON schema.
public struct RuntimeOptions: Sendable, Equatable {
    /// Path of the QMP Unix socket (`-api-channel unix:PATH`).
    public var apiChannelPath: String?
    /// `-D PATH`: where the VMM writes its log.
    public var logFile: String?
    /// `-pidfile PATH` (only together with `-daemonize`).
    public var pidfile: String?
    public var disableSeccomp: Bool
    public var daemonize: Bool

    public init(
        apiChannelPath: String? = nil,
        logFile: String? = nil,
        pidfile: String? = nil,
        disableSeccomp: Bool = false,
        daemonize: Bool = false
    ) {
        self.apiChannelPath = apiChannelPath
        self.logFile = logFile
        self.pidfile = pidfile
        self.disableSeccomp = disableSeccomp
        self.daemonize = daemonize
    }
}
